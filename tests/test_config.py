from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.config import Config, ConfigError, load, parse

EXAMPLE = Path(__file__).parent.parent / "config" / "gatewayd.toml"


def test_example_documents_every_key_with_its_default() -> None:
    text = EXAMPLE.read_text()
    cfg = load(EXAMPLE)
    defaults = Config()
    for section in ("gateway", "wireguard", "enforcement", "challenge", "auth"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    for name in Config.__dataclass_fields__:
        for key in type(getattr(defaults, name)).__dataclass_fields__:
            documented = f"\n{key} = " in text or f"\n[{name}.{key}]" in text
            assert documented, f"{name}.{key} is not documented in the example"


FLEET = "[fleet]\nendpoints = ['10.0.0.1:2379']\nname = 'eu'\nca_file = '/ca'\ncert_file = '/c'\nkey_file = '/k'\n"


@pytest.mark.parametrize(("snippet", "key"), [
    ("[gateway]\nidd = 'x'\n", "gateway.idd"),
    ("[gatway]\n", "gatway"),
    ("[wireguard]\npoll_interval = 'fast'\n", "wireguard.poll_interval"),
    ("[wireguard]\npoll_interval = 0.01\n", "wireguard.poll_interval"),
    ("[wireguard]\nbackend = 'magic'\n", "wireguard.backend"),
    ("[auth]\nmax_failures = 0\n", "auth.max_failures"),
    ("[control]\nlisten = '0.0.0.0:9440'\n", "control.tls_cert_file"),
    ("[control]\nlisten = 'nowhere'\n", "control.listen"),
    ("[control.authorization]\nops = ['Disconect']\n", "control.authorization.ops[0]"),
    ("[challenge]\nlisten = ['1.2.3.4']\n", "challenge.listen[0]"),
    ("[gateway]\nid = 'a/b'\n", "gateway.id"),
    ("[gateway]\nquarantine_unknown_peers = 1\n", "gateway.quarantine_unknown_peers"),
    ("[handshake]\nqueue_num = 65536\n", "handshake.queue_num"),
    ("[handshake]\nqueue_num = -1\n", "handshake.queue_num"),
    ("[handshake]\nqueue = 'native'\n", "handshake.queue"),
    ("[handshake]\ndaemon_down = 'open'\n", "handshake.daemon_down"),
    ("[handshake]\nqueue_mark = 0\n", "handshake.queue_mark"),
    ("[handshake]\nqueue_mark = 0x0c000000\n", "handshake.queue_mark"),
    ("[handshake]\nrecent_mark = 0x100000000\n", "handshake.recent_mark"),
    ("[handshake]\nrecent_mark = 0x04000000\n", "handshake.recent_mark"),
    ("[handshake]\nrate = 0\n", "handshake.rate"),
    ("[handshake]\nburst = 0\n", "handshake.burst"),
    ("[handshake]\nrecent_seconds = 0\n", "handshake.recent_seconds"),
    ("[handshake]\ndetect = 'yes'\n", "handshake.detect"),
    ("[fleet]\nendpoints = ['10.0.0.1:2379']\nname = 'eu'\n", "fleet.ca_file"),
    ("[fleet]\nendpoints = ['etcd:2379']\n", "fleet.endpoints[0]"),
    ("[fleet]\nendpoints = ['10.0.0.1:99999']\n", "fleet.endpoints[0]"),
    ("[fleet]\nendpoints = '10.0.0.1:2379'\n", "fleet.endpoints"),
    (FLEET.replace("'eu'", "''"), "fleet.name"),
    (FLEET.replace("'eu'", "'eu/west'"), "fleet.name"),
    (FLEET.replace("'eu'", "'\u00e9u'"), "fleet.name"),
    (FLEET + "timeout = 0\n", "fleet.timeout"),
    (FLEET + "timeout = 31\n", "fleet.timeout"),
    (FLEET + "retention_days = 0.5\n", "fleet.retention_days"),
    (FLEET + "on_unavailable = 'open'\n", "fleet.on_unavailable"),
    (FLEET + "on_unavailable = true\n", "fleet.on_unavailable"),
    ("[mqtt]\nhost = 'b1'\nbrokers = ['b2']\n", "mqtt.brokers[0]"),
    ("[mqtt]\nhost = 'b1'\nbrokers = ['b2:0']\n", "mqtt.brokers[0]"),
    ("[mqtt]\nhost = 'b1'\nbrokers = [':1883']\n", "mqtt.brokers[0]"),
    ("[mqtt]\nhost = 'b1'\nbrokers = ['user@b2:1883']\n", "mqtt.brokers[0]"),
    ("[mqtt]\nhost = 'b1'\nbrokers = ['10.0.0.2:0x10']\n", "mqtt.brokers[0]"),
])
def test_bad_key_or_value_is_named(snippet: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(snippet)
    assert info.value.key == key


def test_poll_interval_is_auto_or_seconds() -> None:
    assert parse("").wireguard.poll_interval == "auto"
    assert parse("[wireguard]\npoll_interval = 'auto'\n").wireguard.poll_interval == "auto"
    assert parse("[wireguard]\npoll_interval = 2\n").wireguard.poll_interval == 2.0
    with pytest.raises(ConfigError, match="must be a number or auto"):
        parse("[wireguard]\npoll_interval = 'fast'\n")


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "gatewayd", "check-config", "--config", str(EXAMPLE)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[auth]\nmax_delay = 'soon'\n")
    out = subprocess.run([sys.executable, "-m", "gatewayd", "check-config", "--config", str(bad)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "auth.max_delay" in out.stderr


def test_fleet_example_parses_and_a_fleet_needs_no_other_change() -> None:
    cfg = load(Path(__file__).resolve().parents[1] / "config" / "gatewayd-fleet.toml")
    assert len(cfg.fleet.endpoints) == 3 and cfg.fleet.on_unavailable == "closed"
    assert cfg.mqtt.brokers and cfg.gateway.id == "gw-paris-1"
    assert parse(FLEET).fleet.name == "eu" and not parse("").fleet.endpoints
    assert parse("[mqtt]\nhost = 'b1'\nbrokers = ['b2.example.net:8883', '[fd00::2]:1883']\n").mqtt.brokers
