"""Configuration: TOML into frozen dataclasses. An unknown key or a bad value is an error naming the key."""

from __future__ import annotations

import contextlib
import ipaddress
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from gatewayd.auth.device import DevicePolicy
from gatewayd.auth.limits import AttemptPolicy


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True, kw_only=True)
class GatewaySection:
    id: str = "gateway-1"
    """This gateway's id: the CloudEvents source and the MQTT topic segment."""
    database: Path = Path("/var/lib/gatewayd/state.db")
    """SQLite database file."""
    secrets_key_file: Path = Path("/run/credentials/gatewayd.service/secrets-key")
    """32-byte key (raw or 64 hex digits) that encrypts factor secrets at rest; from systemd LoadCredential."""
    quarantine_unknown_peers: bool = True
    """Peers not mapped to a member are locked in quarantine (false: forwarded)."""
    event_retention: int = 100_000
    """Events kept in the outbox for WatchEvents resumption."""
    min_free_bytes: int = 64 * 1024 * 1024
    """Warn when less than this is free on the database's filesystem (a full disk refuses writes)."""


@dataclass(frozen=True, kw_only=True)
class WireGuardSection:
    interface: str = "wg0"
    """The WireGuard interface whose peers are tracked and enforced."""
    backend: Literal["auto", "kernel", "uapi"] = "auto"
    """How peers are read: kernel generic netlink, the userspace UAPI socket, or auto (kernel if present)."""
    uapi_socket_dir: Path = Path("/var/run/wireguard")
    """Where userspace implementations put <interface>.sock."""
    poll_interval: float | Literal["auto"] = "auto"
    """Seconds between two reads of the interface's peers, or auto (see gatewayd.scheduling.auto_poll_interval)."""


@dataclass(frozen=True, kw_only=True)
class EnforcementSection:
    table: str = "gatewayd"
    """The nftables table (family inet) that gatewayd owns. It touches no other."""
    verify_interval: float = 30.0
    """Seconds between two full comparisons of the kernel's table with the desired state (changes by others are
    noticed at once through nftables notifications; this catches lost ones)."""


@dataclass(frozen=True, kw_only=True)
class HandshakeSection:
    detect: bool = True
    """See each WireGuard handshake initiation as it arrives (nfnetlink_queue) and decide its session before
    WireGuard gets it. Off: sessions are only seen by reading the interface (README, Known limits)."""
    queue: Literal["auto", "nft", "xt"] = "auto"
    """How initiations reach the queue: nftables' own queue expression, the xt NFQUEUE target through
    iptables-nft (kernels without CONFIG_NFT_QUEUE), or auto (nft if the kernel has it)."""
    queue_num: int = 5182
    """The nfnetlink_queue number (0-65535); one gatewayd per number."""
    daemon_down: Literal["closed", "bypass"] = "closed"
    """While gatewayd is not running: closed drops initiations (no session starts unseen; running sessions go
    on with their keys); bypass lets them through unseen."""
    new_endpoint_is_new_session: bool = True
    """An initiation from another endpoint than the live session's starts a new session."""
    rate: int = 50
    """Initiations per second per source address that are looked at; the excess is dropped in nftables."""
    burst: int = 100
    """Initiations allowed at once above `rate` per source address."""
    queue_mark: int = 0x04000000
    """Packet mark bit gatewayd's nftables chain sets on initiations for the queue rule."""
    recent_mark: int = 0x08000000
    """Packet mark bit set on an initiation whose endpoint sent data in the last `recent_seconds`."""
    recent_seconds: int = 15
    """How long a data packet from an endpoint counts as recent (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)."""


@dataclass(frozen=True, kw_only=True)
class ControlSection:
    listen: str = ""
    """host:port of the mTLS control listener; empty = none."""
    tls_cert_file: Path | None = None
    """Server certificate chain (PEM)."""
    tls_key_file: Path | None = None
    """Server private key (PEM)."""
    client_ca_file: Path | None = None
    """CA bundle for client certificates (PEM)."""
    unix_socket: Path | None = Path("/run/gatewayd/control.sock")
    """Local socket for the operator CLI; empty = none."""
    unix_socket_mode: int = 0o660
    """Permissions of the local socket."""
    unix_principal: str = "local-ops"
    """The principal that callers on the local socket act as."""
    max_message_bytes: int = 65536
    """Largest request accepted."""
    max_deadline: float = 30.0
    """Longest any call may run, whatever the client's deadline."""
    authorization: dict[str, list[str]] = field(default_factory=dict)
    """Principal (certificate SAN or CN, or unix_principal) -> allowed method names, or ["*"]. Default deny."""


@dataclass(frozen=True, kw_only=True)
class ChallengeSection:
    listen: list[str] = field(default_factory=list)
    """host:port addresses of the challenge listener; empty (the default): the WireGuard interface's own
    addresses (IPv4 and IPv6, not link-local) on `port`, rebound when they change."""
    port: int = 9443
    """The challenge port that quarantined peers may reach on the gateway (nftables rule)."""
    workers: int = 0
    """Processes that serve the challenge listener's gRPC (SO_REUSEPORT on the same addresses), relaying each call
    to the daemon, which checks and serves it as its own listener would; 0: the daemon serves it itself."""
    calls_per_second: float = 10.0
    """Challenge calls a second allowed per peer (a caller that is no peer: per address), on average."""
    calls_burst: int = 50
    """Calls a peer (or address) may make at once before its rate applies."""


@dataclass(frozen=True, kw_only=True)
class MetricsSection:
    listen: str = "127.0.0.1:9109"
    """host:port of the Prometheus endpoint (GET /metrics); empty: none."""


@dataclass(frozen=True, kw_only=True)
class MqttSection:
    host: str = ""
    """Broker host; empty: no broker (events go to WatchEvents and the log only)."""
    port: int = 1883
    """Broker port."""
    brokers: list[str] = field(default_factory=list)
    """More brokers (host:port; a name or an address), tried in turn after host:port when the one in use cannot
    be reached."""
    topic_prefix: str = "gatewayd"
    """Events go to <topic_prefix>/<gateway id>/events/<type>; status to <topic_prefix>/<gateway id>/status."""
    client_id: str = ""
    """MQTT client id; empty: gatewayd-<gateway id>."""
    username: str = ""
    """Username; empty: none."""
    password_file: Path | None = None
    """File with the password (systemd LoadCredential)."""
    tls: bool = False
    """Connect with TLS."""
    ca_file: Path | None = None
    """CA bundle for the broker certificate; empty: the system's."""
    cert_file: Path | None = None
    """Client certificate (PEM), if the broker wants one."""
    key_file: Path | None = None
    """Client key (PEM)."""
    in_flight: int = 64
    """Messages awaiting PUBACK at once."""
    keepalive: int = 30
    """MQTT keepalive in seconds."""
    max_unpublished: int = 1_000_000
    """Events kept for a broker that is down; beyond it the oldest are dropped (and logged)."""


@dataclass(frozen=True, kw_only=True)
class FleetSection:
    endpoints: list[str] = field(default_factory=list)
    """host:port of each etcd member (IP addresses); empty (the default): no fleet, this gateway decides alone."""
    name: str = ""
    """The fleet's name: its ledger lives under /gatewayd/<name>/ in etcd (several fleets may share a cluster)."""
    ca_file: Path | None = None
    """CA bundle for the etcd members' certificates (PEM)."""
    cert_file: Path | None = None
    """This gateway's client certificate for etcd (PEM): its identity in the fleet."""
    key_file: Path | None = None
    """Its private key (PEM)."""
    server_name: str = ""
    """Name the etcd certificates are checked against; empty: the first endpoint's address."""
    on_unavailable: Literal["closed", "local"] = "closed"
    """etcd unreachable: closed refuses proofs (UNAVAILABLE) since they cannot be spent fleet-wide; local decides
    them on this gateway's state alone (a code may then be used once per gateway). Quarantine and Disconnect
    work locally either way."""
    timeout: float = 2.0
    """Seconds a ledger operation may take, retries across members included."""
    retention_days: float = 30.0
    """How long step-up demands and confirmed MFA resets stay in the ledger."""


@dataclass(frozen=True, kw_only=True)
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    """[gateway]"""
    wireguard: WireGuardSection = field(default_factory=WireGuardSection)
    """[wireguard]"""
    enforcement: EnforcementSection = field(default_factory=EnforcementSection)
    """[enforcement]"""
    handshake: HandshakeSection = field(default_factory=HandshakeSection)
    """[handshake]: sessions decided at the handshake"""
    control: ControlSection = field(default_factory=ControlSection)
    """[control]"""
    challenge: ChallengeSection = field(default_factory=ChallengeSection)
    """[challenge]"""
    auth: AttemptPolicy = field(default_factory=AttemptPolicy)
    """[auth]: attempt limits for proofs (gatewayd.auth.limits)"""
    device: DevicePolicy = field(default_factory=DevicePolicy)
    """[device]: WebAuthn settings for device proofs (gatewayd.auth.device)"""
    mqtt: MqttSection = field(default_factory=MqttSection)
    """[mqtt]"""
    metrics: MetricsSection = field(default_factory=MetricsSection)
    """[metrics]"""
    fleet: FleetSection = field(default_factory=FleetSection)
    """[fleet]: share spends, failure counts and step-up demands with other gateways through etcd"""


MAX_CHALLENGE_WORKERS = 16
METHODS = {"Disconnect", "ApplyTeamPolicy", "UpsertMember", "RemoveMember", "ResetMfa", "UnlockMfa",
           "ListSessions", "GetSession", "WatchEvents", "GetStatus", "GetTeamPolicy"}


def _convert(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value == "" and type(None) in typing.get_args(hint):
            return None
        if len(options) == 1:
            return _convert(key, options[0], value)
        for option in options:
            with contextlib.suppress(ConfigError):
                return _convert(key, option, value)
        raise ConfigError(key, "must be " + " or ".join(
            "a number" if o is float else " or ".join(map(str, typing.get_args(o))) for o in options))
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(key, f"must be one of {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(key, "must be a list")
        return [_convert(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is tuple:  # tuple[X, ...]: a TOML array, kept immutable
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(key, "must be a list")
        return tuple(_convert(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(key, "must be a table")
        return {k: _convert(f"{key}.{k}", item, v) for k, v in value.items()}
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "must be a non-empty path")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, "must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        return value
    if is_dataclass(hint):
        return _section(key, typing.cast(type, hint), value)
    raise ConfigError(key, f"unsupported type {hint}")


def _section(prefix: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(prefix, "must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}" if prefix else key, "unknown key")
    kwargs = {}
    for f in fields(cls):
        if f.name in table:
            kwargs[f.name] = _convert(f"{prefix}.{f.name}" if prefix else f.name, hints[f.name], table[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}.{f.name}", "is required")
    return cls(**kwargs)


def _host_port(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"{value!r} is not host:port")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host != "localhost":
            raise ConfigError(key, f"{host!r} is not an IP address") from None


def validate(cfg: Config) -> Config:
    if not cfg.gateway.id or len(cfg.gateway.id) > 64 or "/" in cfg.gateway.id or "+" in cfg.gateway.id \
            or "#" in cfg.gateway.id:
        raise ConfigError("gateway.id", "must be 1-64 characters without '/', '+' or '#'")
    if cfg.gateway.event_retention < 1:
        raise ConfigError("gateway.event_retention", "must be at least 1")
    if cfg.wireguard.poll_interval != "auto" and not 0.05 <= cfg.wireguard.poll_interval <= 60:
        raise ConfigError("wireguard.poll_interval", "must be between 0.05 and 60 seconds")
    if not cfg.wireguard.interface or len(cfg.wireguard.interface) > 15:
        raise ConfigError("wireguard.interface", "must be an interface name of 1-15 characters")
    if not 1 <= cfg.enforcement.verify_interval <= 3600:
        raise ConfigError("enforcement.verify_interval", "must be between 1 and 3600 seconds")
    if not cfg.enforcement.table.replace("_", "").isalnum():
        raise ConfigError("enforcement.table", "must be letters, digits and '_'")
    h = cfg.handshake
    if not 0 <= h.queue_num <= 65535:
        raise ConfigError("handshake.queue_num", "must be 0-65535")
    if not 1 <= h.rate <= 100_000:
        raise ConfigError("handshake.rate", "must be 1 to 100000 per second")
    if not 1 <= h.burst <= 1_000_000:
        raise ConfigError("handshake.burst", "must be 1 to 1000000")
    for name in ("queue_mark", "recent_mark"):
        bit = getattr(h, name)
        if not 0 < bit <= 0xFFFFFFFF or bit & (bit - 1):
            raise ConfigError(f"handshake.{name}", "must be a single bit of the 32-bit packet mark")
    if h.queue_mark == h.recent_mark:
        raise ConfigError("handshake.recent_mark", "must differ from handshake.queue_mark")
    if not 1 <= h.recent_seconds <= 120:
        raise ConfigError("handshake.recent_seconds", "must be 1 to 120 seconds")
    if cfg.control.listen:
        _host_port("control.listen", cfg.control.listen)
        for name in ("tls_cert_file", "tls_key_file", "client_ca_file"):
            if getattr(cfg.control, name) is None:
                raise ConfigError(f"control.{name}", "is required when control.listen is set (mTLS is mandatory)")
    for principal, methods in cfg.control.authorization.items():
        for i, m in enumerate(methods):
            if m != "*" and m not in METHODS:
                raise ConfigError(f"control.authorization.{principal}[{i}]", f"unknown method {m!r}")
    if not 1024 <= cfg.control.max_message_bytes <= 4 * 1024 * 1024:
        raise ConfigError("control.max_message_bytes", "must be between 1024 and 4194304")
    if not 0 < cfg.control.max_deadline <= 600:
        raise ConfigError("control.max_deadline", "must be between 0 and 600 seconds")
    if not 0 <= cfg.control.unix_socket_mode <= 0o777:
        raise ConfigError("control.unix_socket_mode", "must be a file mode such as 0o660")
    for i, address in enumerate(cfg.challenge.listen):
        _host_port(f"challenge.listen[{i}]", address)
    if not 1 <= cfg.challenge.port <= 65535:
        raise ConfigError("challenge.port", "must be a port number")
    if not 0 <= cfg.challenge.workers <= MAX_CHALLENGE_WORKERS:
        raise ConfigError("challenge.workers", f"must be between 0 and {MAX_CHALLENGE_WORKERS}")
    if not 0.1 <= cfg.challenge.calls_per_second <= 100_000:
        raise ConfigError("challenge.calls_per_second", "must be between 0.1 and 100000")
    if not 1 <= cfg.challenge.calls_burst <= 100_000:
        raise ConfigError("challenge.calls_burst", "must be between 1 and 100000")
    if cfg.metrics.listen:
        _host_port("metrics.listen", cfg.metrics.listen)
    mq = cfg.mqtt
    if mq.host:
        if not 1 <= mq.port <= 65535:
            raise ConfigError("mqtt.port", "must be a port number")
        for i, broker in enumerate(mq.brokers):
            host, sep, port = broker.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 \
                    or any(c.isspace() or c in "/@" for c in host):
                raise ConfigError(f"mqtt.brokers[{i}]", f"{broker!r} is not host:port")
        if not 1 <= mq.in_flight <= 1000:
            raise ConfigError("mqtt.in_flight", "must be 1 to 1000")
        if not 5 <= mq.keepalive <= 3600:
            raise ConfigError("mqtt.keepalive", "must be 5 to 3600 seconds")
        if bool(mq.cert_file) != bool(mq.key_file):
            raise ConfigError("mqtt.cert_file", "cert_file and key_file go together")
        if any(c in mq.topic_prefix for c in "#+") or not mq.topic_prefix:
            raise ConfigError("mqtt.topic_prefix", "must be a topic level without wildcards")
    if mq.max_unpublished < 1000:
        raise ConfigError("mqtt.max_unpublished", "must be at least 1000")
    fl = cfg.fleet
    if fl.endpoints:
        for i, endpoint in enumerate(fl.endpoints):
            _host_port(f"fleet.endpoints[{i}]", endpoint)
        if not fl.name or len(fl.name) > 64 or not fl.name.replace("-", "").replace("_", "").isalnum() \
                or not fl.name.isascii():
            raise ConfigError("fleet.name", "must be 1-64 ASCII letters, digits, '-' or '_'")
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(fl, name) is None:
                raise ConfigError(f"fleet.{name}", "is required when fleet.endpoints is set (mTLS is mandatory)")
        if not 0.1 <= fl.timeout <= 30:
            raise ConfigError("fleet.timeout", "must be between 0.1 and 30 seconds")
        if not 1 <= fl.retention_days <= 3650:
            raise ConfigError("fleet.retention_days", "must be between 1 and 3650 days")
    d = cfg.device
    if not d.rp_id or "/" in d.rp_id or ":" in d.rp_id:
        raise ConfigError("device.rp_id", "must be a domain name (no scheme, port or path)")
    if not d.origins:
        raise ConfigError("device.origins", "must list at least one origin")
    for i, origin in enumerate(d.origins):
        if not origin.startswith(("https://", "http://localhost")):
            raise ConfigError(f"device.origins[{i}]", "must be an https:// origin (or http://localhost)")
    if not 1 <= d.challenge_ttl <= 120:
        raise ConfigError("device.challenge_ttl", "must be between 1 and 120 seconds")
    a = cfg.auth
    if not 1 <= a.max_failures <= 100:
        raise ConfigError("auth.max_failures", "must be 1 to 100")
    if not 0 <= a.free_failures <= a.max_failures:
        raise ConfigError("auth.free_failures", "must be between 0 and auth.max_failures")
    if not 0 < a.base_delay <= a.max_delay:
        raise ConfigError("auth.base_delay", "must be positive and at most auth.max_delay")
    if a.max_delay > 3600:
        raise ConfigError("auth.max_delay", "must be at most 3600 seconds")
    return cfg


def parse(text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"not valid TOML: {exc}") from None
    cfg = _section("", Config, data)
    assert isinstance(cfg, Config)
    return validate(cfg)


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {path}: {exc.strerror}") from None
    return parse(text)
