"""WireGuard handshake initiations brought to the daemon through nfnetlink_queue, over a raw netlink socket.

The packets come from the `handshake` chains of gatewayd's nftables table (see adapters/nftables.py), which mark
each initiation to the interface's listen port (after rate-limiting it per source) and each initiation the
gateway's WireGuard sends from that port. A queue rule outside the table sends marked packets to the queue, in
the input and output hooks at priority -150 (after gatewayd's chains at -200), one of two ways:
- `nft`: nftables' own `queue num N`, in a table `<table>_queue` (kernels with CONFIG_NFT_QUEUE, most
  distributions);
- `xt`: the kernel lacks the native expression, so iptables-nft rules (IPv4 and IPv6, mangle INPUT and OUTPUT)
  with the xt NFQUEUE target.
`pick_mode` tries the native expression (a rule in a chain no packet passes) and falls back.

Without `bypass`, the kernel drops what it would queue while nobody listens: initiations are not let through
unseen while the daemon is down (sessions keep running on their keys; clients retry every 5 s). With `bypass` they
pass unseen instead. Every queued packet waits for a verdict; the socket's buffer overflowing drops packets
(fail closed), and the client retries.
"""

from __future__ import annotations

import errno
import logging
import shlex
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable

import nftables

from gatewayd.errors import StartupError
from gatewayd.netlink import Subscription, attrs, messages, nla
from gatewayd.ports import QueuedPacket

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_PAYLOAD = 1, 2, 3, 10
NF_DROP, NF_ACCEPT = 0, 1
NF_INET_LOCAL_OUT = 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
COPY_RANGE = 512  # an initiation's IP packet is 176 (IPv4) or 196 (IPv6) bytes; options and headers fit
RULE_COMMENT = "gatewayd handshake queue"
CHAINS = ("INPUT", "OUTPUT")


class QueueError(StartupError):
    """The queue or its rule cannot be set up (at start-up: gatewayd does not start)."""


class HandshakeQueue:
    """One nfnetlink_queue bound on the event loop. `on_packets` gets each datagram's packets (a list, in the
    kernel's order); verdicts are sent with `accept` / `drop`, in any order."""

    def __init__(self, number: int, on_packets: Callable[[list[QueuedPacket]], None], *,
                 max_len: int = 4096, rcvbuf: int = 8 << 20) -> None:
        if not 0 <= number <= 0xFFFF:
            raise QueueError(f"queue number {number} is not 0-65535")
        self.number, self.on_packets, self.max_len = number, on_packets, max_len
        self._sub = Subscription(NETLINK_NETFILTER, 0, self._received, self._overflow, rcvbuf=rcvbuf,
                                 configure=self._bind)
        self._seq = 0
        self.overflows = 0

    def _message(self, msg_type: int, flags: int, body: bytes) -> bytes:
        self._seq += 1
        payload = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(self.number)) + body
        return struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_QUEUE << 8) | msg_type,
                           NLM_F_REQUEST | flags, self._seq, 0) + payload

    def _configure(self, sock: socket.socket, body: bytes) -> None:
        sock.send(self._message(NFQNL_MSG_CONFIG, NLM_F_ACK, body))
        for kind, payload in messages(sock.recv(65536)):
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code in (-errno.EBUSY, -errno.EPERM):
                    # The kernel answers EPERM when another socket owns the queue.
                    raise QueueError(f"queue {self.number} is already bound by another process (or gatewayd "
                                     "lacks CAP_NET_ADMIN); set handshake.queue_num to a free number")
                if code:
                    raise QueueError(f"binding queue {self.number}: {errno.errorcode.get(-code, -code)}")

    def _bind(self, sock: socket.socket) -> None:
        self._configure(sock, nla(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._configure(sock, nla(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
                        + nla(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", self.max_len)))

    def start(self) -> None:
        self._sub.start()

    def close(self) -> None:
        """Unbind (packets queued and not yet answered are dropped by the kernel)."""
        self._sub.close()

    def _overflow(self, exc: OSError) -> None:
        if exc.errno != errno.ENOBUFS:
            raise exc
        # The kernel could not hand us packets: it dropped them (no fail-open flag). Clients retry.
        self.overflows += 1

    def _received(self, data: bytes) -> None:
        packets = []
        for kind, payload in messages(data):
            if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                continue
            packet_id = mark = None
            hook = 0
            body = b""
            for attr, value in attrs(payload[4:]):
                if attr == NFQA_PACKET_HDR:
                    packet_id, _proto, hook = struct.unpack_from("!IHB", value)
                elif attr == NFQA_MARK:
                    (mark,) = struct.unpack_from("!I", value)
                elif attr == NFQA_PAYLOAD:
                    body = value
            if packet_id is not None:
                packets.append(QueuedPacket(id=packet_id, mark=mark or 0, payload=body,
                                            outgoing=hook == NF_INET_LOCAL_OUT))
        if packets:
            self.on_packets(packets)

    def verdict(self, packet_id: int, verdict: int) -> None:
        sock = self._sub.sock
        if sock is None:
            return  # unbound: the kernel dropped the packet already
        message = self._message(NFQNL_MSG_VERDICT, 0, nla(NFQA_VERDICT_HDR, struct.pack("!II", verdict,
                                                                                          packet_id)))
        try:
            sock.send(message)
        except BlockingIOError:
            # The kernel's socket buffer for verdicts is full (never seen): the packet times out queued and
            # is dropped when the queue is unbound; the client retries.
            log.warning("verdict for packet %d not sent: socket busy", packet_id)

    def accept(self, packet_id: int) -> None:
        self.verdict(packet_id, NF_ACCEPT)

    def drop(self, packet_id: int) -> None:
        self.verdict(packet_id, NF_DROP)


# ---- how packets get into the queue ---------------------------------------------------------------


def native_queue_supported() -> bool:
    """Whether nftables' own `queue` expression exists in this kernel: a rule using it, in a chain no packet
    passes (no hook), in a table removed at once."""
    nft = nftables.Nftables()
    rc, _out, _err = nft.cmd(
        "add table inet gatewayd_probe\n"
        "add chain inet gatewayd_probe probe\n"
        "add rule inet gatewayd_probe probe queue num 0 bypass\n")
    nft.cmd("delete table inet gatewayd_probe")
    return bool(rc == 0)


def pick_mode(configured: str) -> str:
    """"nft" or "xt" for the configured "auto", "nft" or "xt" (the kernel is probed unless "xt")."""
    if configured == "xt":
        return "xt"
    native = native_queue_supported()
    if configured == "nft" and not native:
        raise QueueError('handshake.queue is "nft" but this kernel has no nftables queue expression '
                         '(CONFIG_NFT_QUEUE): use "xt" (iptables-nft) or "auto"')
    return "nft" if native else "xt"


class XtQueueRule:
    """The iptables-nft rules (IPv4 and IPv6) that send packets carrying gatewayd's queue mark to the NFQUEUE
    target. Each is recognised by its comment; `ensure` replaces any that differ from the wanted one."""

    TOOLS = ("iptables-nft", "ip6tables-nft")

    def __init__(self, *, number: int, mark: int, bypass: bool) -> None:
        self.number, self.mark, self.bypass = number, mark, bypass
        missing = [t for t in self.TOOLS if shutil.which(t) is None]
        if missing:
            raise QueueError(f"{', '.join(missing)} not found (Debian package iptables): the kernel has no "
                             "native nftables queue, so the xt NFQUEUE target is needed")

    def spec(self) -> list[str]:
        out = ["-m", "mark", "--mark", f"{self.mark:#x}/{self.mark:#x}", "-m", "comment", "--comment",
               RULE_COMMENT, "-j", "NFQUEUE", "--queue-num", str(self.number)]
        return out + (["--queue-bypass"] if self.bypass else [])

    @staticmethod
    def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return _iptables(tool, *args)

    def present(self) -> bool:
        return all(self._run(tool, "-C", chain, *self.spec()).returncode == 0
                   for tool in self.TOOLS for chain in CHAINS)

    def ensure(self) -> bool:
        """Install the rules unless they are there as wanted; remove gatewayd rules that differ. True if
        anything changed."""
        changed = False
        for tool in self.TOOLS:
            for chain in CHAINS:
                if self._run(tool, "-C", chain, *self.spec()).returncode == 0:
                    continue
                _remove_xt_rules(tool, chain)
                done = self._run(tool, "-I", chain, "1", *self.spec())
                if done.returncode != 0:
                    raise QueueError(f"{tool}: {done.stderr.strip() or 'failed'}")
                changed = True
        return changed

    def remove(self) -> None:
        for tool in self.TOOLS:
            for chain in CHAINS:
                _remove_xt_rules(tool, chain)


def _iptables(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "-w", "5", "-t", "mangle", *args], capture_output=True, text=True, timeout=30)


def _remove_xt_rules(tool: str, chain: str) -> None:
    """Delete every rule of `chain` that carries gatewayd's comment, whatever its other options."""
    for line in _iptables(tool, "-S", chain).stdout.splitlines():
        if RULE_COMMENT in line and line.startswith(f"-A {chain} "):
            _iptables(tool, "-D", chain, *shlex.split(line[len(f"-A {chain} "):]))


class NftQueueRule:
    """nftables' own queue expression, in a small table of its own (`<table>_queue`, input and output hooks at
    -150, after gatewayd's chains at -200): the same place in the path as the xt rules. Not exercised on this
    project's test machines, whose kernel lacks the expression."""

    def __init__(self, *, table: str, number: int, mark: int, bypass: bool) -> None:
        self.table, self.number, self.mark, self.bypass = f"{table}_queue", number, mark, bypass

    def _text(self) -> str:
        text = f"add table inet {self.table}\n"
        for hook in ("input", "output"):
            text += (f"add chain inet {self.table} {hook} {{ type filter hook {hook} priority -150; }}\n"
                     f"flush chain inet {self.table} {hook}\n"
                     f"add rule inet {self.table} {hook} meta mark & {self.mark:#x} == {self.mark:#x} "
                     f"queue num {self.number}{' bypass' if self.bypass else ''}\n")
        return text

    def _run(self, text: str) -> tuple[int, str]:
        nft = nftables.Nftables()
        rc, out, err = nft.cmd(text)
        return rc, out if rc == 0 else err

    def present(self) -> bool:
        for hook in ("input", "output"):
            rc, out = self._run(f"list chain inet {self.table} {hook}")
            if rc != 0 or f"queue num {self.number}" not in out or (" bypass" in out) != self.bypass:
                return False
        return True

    def ensure(self) -> bool:
        if self.present():
            return False
        rc, err = self._run(self._text())
        if rc != 0:
            raise QueueError(f"nftables queue rule: {err.strip()}")
        return True

    def remove(self) -> None:
        self._run(f"delete table inet {self.table}")


class StaleQueueRules:
    """With handshake detection off: whatever queue rule an earlier run left (either kind), to remove at start
    (a fail-closed rule with nobody listening would drop every initiation)."""

    def __init__(self, *, table: str) -> None:
        self.table = table

    def ensure(self) -> bool:
        return False

    def present(self) -> bool:
        return False

    def remove(self) -> None:
        NftQueueRule(table=self.table, number=0, mark=0, bypass=False).remove()
        if all(shutil.which(t) for t in XtQueueRule.TOOLS):
            for tool in XtQueueRule.TOOLS:
                for chain in CHAINS:
                    _remove_xt_rules(tool, chain)

