#!/bin/bash
# make deb: a Debian package of gatewayd (dpkg-deb, no debhelper). gatewayd and its locked dependencies go into
# a virtualenv at /opt/gatewayd, built with Debian's python3 (the interpreter the target runs); the unit, the
# example config (a conffile), gatewayctl and gatewayd-client on PATH, and maintainer scripts that create the
# gatewayd system user and the credentials directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=${1:-$top/dist}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/pyproject.toml")
arch=$(dpkg --print-architecture)
stage=$(mktemp -d /tmp/gatewayd-deb.XXXXXX)
trap 'rm -rf "$stage" /opt/gatewayd.build' EXIT

# The venv is built where it will live (its scripts name their interpreter by path), then moved into the stage.
rm -rf /opt/gatewayd.build
/usr/bin/python3 -m venv /opt/gatewayd.build
/opt/gatewayd.build/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
    -r <(grep -v -e '^pip==' "$top/requirements.lock")
/opt/gatewayd.build/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation "$top"
/opt/gatewayd.build/bin/pip uninstall --quiet -y pytest pytest-asyncio hypothesis ruff mypy mypy-protobuf \
    grpcio-tools types-protobuf >/dev/null 2>&1 || true
find /opt/gatewayd.build -name '__pycache__' -prune -exec rm -rf {} +
grep -rlI '/opt/gatewayd.build' /opt/gatewayd.build/bin | xargs sed -i 's|/opt/gatewayd.build|/opt/gatewayd|g'
sed -i 's|/opt/gatewayd.build|/opt/gatewayd|g' /opt/gatewayd.build/pyvenv.cfg
mkdir -p "$stage/opt"
mv /opt/gatewayd.build "$stage/opt/gatewayd"
cp "$top/README.md" "$stage/opt/gatewayd/README.md"

install -D -m 0644 "$top/systemd/gatewayd.service" "$stage/lib/systemd/system/gatewayd.service"
install -D -m 0640 "$top/config/gatewayd.toml" "$stage/etc/gatewayd/gatewayd.toml"
install -D -m 0644 "$top/config/gatewayd-fleet.toml" "$stage/usr/share/doc/gatewayd/examples/gatewayd-fleet.toml"
install -D -m 0644 "$top/contrib/prometheus/gatewayd-alerts.yml" "$stage/usr/share/doc/gatewayd/contrib/gatewayd-alerts.yml"
install -D -m 0644 "$top/contrib/grafana/gatewayd.json" "$stage/usr/share/doc/gatewayd/contrib/grafana-gatewayd.json"
mkdir -p "$stage/usr/bin"
for tool in gatewayctl gatewayd-client; do ln -s "/opt/gatewayd/bin/$tool" "$stage/usr/bin/$tool"; done

mkdir -p "$stage/DEBIAN"
size=$(du -sk "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" "$here/control" > "$stage/DEBIAN/control"
cp "$here/conffiles" "$stage/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$stage/DEBIAN/"
mkdir -p "$out"
dpkg-deb --root-owner-group --build "$stage" "$out/gatewayd_${version}_${arch}.deb" >/dev/null
echo "$out/gatewayd_${version}_${arch}.deb"
