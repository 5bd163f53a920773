# gatewayd: the two commands are `make demo` (the real thing, in network namespaces) and `make test`.
# Both set up everything on a fresh Debian machine (run as root): system packages, a venv from the lock file.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := nftables libnftables1 wireguard-go wireguard-tools mosquitto mosquitto-clients \
	conntrack iproute2 systemd procps iptables etcd-server etcd-client prometheus systemd-container

.PHONY: test demo deps system-deps proto lint typecheck bench fuzz clean deb install

deps: system-deps $(BIN)/.installed

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Regenerate the protobuf/gRPC modules in gatewayd/v1 (tests/test_proto.py fails when they are stale).
proto: $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/gatewayd/v1/*.proto

lint: $(BIN)/.installed
	$(BIN)/ruff check gatewayd gatewayd_client tests bench

typecheck: $(BIN)/.installed
	$(BIN)/mypy gatewayd gatewayd_client bench tests

test: deps lint typecheck
	$(BIN)/pytest -q

demo: deps
	$(BIN)/python -m gatewayd.lab.demo

# The API fuzzer for longer than make test's bounded profile (tests/api/test_fuzz.py).
fuzz: deps
	GATEWAYD_FUZZ_EXAMPLES=$${GATEWAYD_FUZZ_EXAMPLES:-20000} $(BIN)/pytest -q tests/api/test_fuzz.py

bench: deps
	$(BIN)/python -m bench.disconnect --out bench/results.json
	$(BIN)/python -m bench.drift --out bench/drift.json
	$(BIN)/python -m bench.handshakes --out bench/handshakes.json
	$(BIN)/python -m bench.proofs --out bench/proofs.json
	$(BIN)/python -m bench.scale --out bench/scale.json
	$(BIN)/python -m bench.fleet --out bench/fleet.json

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis

# A Debian package of gatewayd in dist/ (packaging/deb/build.sh), and the same layout without a package.
deb: system-deps
	bash packaging/deb/build.sh dist

install: system-deps
	bash packaging/install.sh
