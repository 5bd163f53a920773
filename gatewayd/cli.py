"""`gatewayd run --config PATH` and `gatewayd check-config --config PATH`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from gatewayd.config import ConfigError, load
from gatewayd.errors import StartupError

DEFAULT_CONFIG = Path("/etc/gatewayd/gatewayd.toml")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging() -> None:
    """JSON lines on stderr (the journal). The record fields the formatter does not print are not gathered: the
    caller's frame, thread and process (the logging HOWTO's "Optimization"; two event lines a proof made the
    frame walk alone 2% of the daemon's event loop under load)."""
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _run(path: Path, *, init_store: bool = False) -> int:
    import uvloop

    from gatewayd.daemon import Daemon, kernel_adapters
    from gatewayd.runtime.memory import freeze_when_ready
    from gatewayd.tasks import spawn

    config = load(path)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        daemon = Daemon(config, kernel_adapters(config), config_path=path, init_store=init_store)
        loop.add_signal_handler(signal.SIGHUP, lambda: spawn(daemon.reload(), name="reload"))
        spawn(freeze_when_ready(daemon.ready, daemon.first_read), name="gc-freeze")
        await daemon.serve(stop)

    uvloop.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatewayd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the daemon"), ("check-config", "validate a configuration file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        if name == "run":
            p.add_argument("--init-store", action="store_true",
                           help="if the database file exists but is unusable (empty, not a gatewayd database, "
                           "corrupt), move it aside and start with an empty one")
            p.add_argument("--traceback", action="store_true", help="show the traceback of a start-up failure")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        if args.command == "check-config":
            load(args.config)
            print(f"{args.config}: ok")
            return 0
        return _run(args.config, init_store=args.init_store)
    except ConfigError as exc:
        print(f"gatewayd: {args.config}: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"gatewayd: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.command == "run" and args.traceback:
            raise
        print(f"gatewayd: stopped on an unexpected error: {type(exc).__name__}: {exc} (run with --traceback for "
              "details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
