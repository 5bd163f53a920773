#!/bin/bash
# make install: gatewayd without a package - the same layout as the .deb (venv at /opt/gatewayd, the unit, the
# config unless one exists, gatewayctl and gatewayd-client on PATH, the gatewayd user, the credentials
# directory). Run as root. Uninstall: systemctl disable --now gatewayd; rm -rf /opt/gatewayd
# /etc/systemd/system/gatewayd.service /usr/local/bin/gatewayctl /usr/local/bin/gatewayd-client (the database in
# /var/lib/gatewayd and /etc/gatewayd stay until you remove them).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
/usr/bin/python3 -m venv /opt/gatewayd
/opt/gatewayd/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r "$top/requirements.lock"
/opt/gatewayd/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation "$top"
install -D -m 0644 "$top/systemd/gatewayd.service" /etc/systemd/system/gatewayd.service
[ -e /etc/gatewayd/gatewayd.toml ] || install -D -m 0640 "$top/config/gatewayd.toml" /etc/gatewayd/gatewayd.toml
for tool in gatewayctl gatewayd-client; do ln -sf "/opt/gatewayd/bin/$tool" "/usr/local/bin/$tool"; done
sh "$top/packaging/deb/postinst" configure
