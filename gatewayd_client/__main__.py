import sys

from gatewayd_client.cli import main

sys.exit(main())
