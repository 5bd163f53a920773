"""No secret ever reaches the logs or the events: TOTP secrets, submitted codes, backup codes and their hashes,
device keys."""

from __future__ import annotations

import base64
import hashlib
import logging
import os

import pytest

from gatewayd.auth import backup
from gatewayd.v1 import challenge_pb2, control_pb2
from tests.harness import SECRET, Harness, gw, key

__all__ = ["gw"]


async def test_full_flow_leaks_nothing(gw: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    salt = os.urandom(16)
    plain = "ZXCV-9876-QWER"
    hashed = hashlib.scrypt(backup.normalize(plain), salt=salt, n=1024, r=8, p=1, dklen=32)
    gw.source.add(key(1), "127.0.0.1/32", handshake=gw.clock())
    await gw.enroll("alice", (key(1),), backup_codes=control_pb2.BackupCodeSet(salt=salt, n=1024, r=8, p=1,
                                                                                hashes=[hashed]))
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="x"))
    ch = gw.challenge()
    wrong = "000000" if gw.code() != "000000" else "111111"
    await ch.SubmitTotp(challenge_pb2.SubmitTotpRequest(code=wrong))
    good = gw.code()
    assert (await ch.SubmitTotp(challenge_pb2.SubmitTotpRequest(code=good))).accepted
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="y"))
    gw.clock.advance(3)
    assert (await ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code=plain))).accepted
    events = " ".join(e.data_json for e in await gw.daemon.store.outbox.events_after(0, 10_000))
    logs = caplog.text
    assert "event " in logs  # the events are logged, so there is something to search
    needles = [SECRET.decode(), base64.b32encode(SECRET).decode(), SECRET.hex(), good, plain, plain.replace("-", ""),
               hashed.hex(), base64.b64encode(hashed).decode(), salt.hex()]
    for needle in needles:
        assert needle not in logs, needle
        assert needle not in events, needle
