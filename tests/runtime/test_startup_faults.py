"""Start-up faults, on the real `gatewayd run` in a network namespace of the test's own: an existing database
file that is empty, garbage, half-truncated, another program's, of a newer schema, corrupt, or on a read-only
mount is refused promptly with one line naming the file (no traceback, no hang), and the kernel's quarantine
table is left as it was; `--init-store` moves such a file aside and starts empty; SIGTERM during start-up ends
the process at once."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.adapters.nfqueue import HandshakeQueue, native_queue_supported
from gatewayd.adapters.sqlite.database import MIGRATIONS
from tests.netns import inside, namespace, nft

pytestmark = pytest.mark.kernel

TABLE = "gwfault"


def config(tmp: Path) -> Path:
    key = tmp / "secrets.key"
    key.write_bytes(os.urandom(32))
    path = tmp / "gatewayd.toml"
    path.write_text(f"""
[gateway]
database = "{tmp / 'db' / 'state.db'}"
secrets_key_file = "{key}"
[wireguard]
interface = "wgfault0"
[enforcement]
table = "{TABLE}"
[control]
unix_socket = "{tmp / 'control.sock'}"
[challenge]
listen = ["127.0.0.1:0"]
[metrics]
listen = ""
""")
    return path


def healthy_database(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for script in MIGRATIONS:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
    conn.execute("INSERT INTO teams VALUES ('t', 1, 'both', 'all', 1, 0, 0)")
    for i in range(300):  # enough pages that one in the middle can be damaged
        conn.execute("INSERT INTO members (member_id, team_id, role) VALUES (?, 't', 'member')", (f"m{i:04}" * 8,))
    conn.commit()
    conn.close()


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace() as name:
        nft(name, "add", "table", "inet", TABLE)
        nft(name, "add", "set", "inet", TABLE, "quarantine4", "{ type ipv4_addr; }")
        nft(name, "add", "element", "inet", TABLE, "quarantine4", "{ 10.0.0.2 }")
        yield name


def run(ns: str, cfg: Path, *extra: str, timeout: float = 20) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "gatewayd", "run", "--config", str(cfg),
                           *extra], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - started


def make(kind: str, db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        db.write_bytes(b"")
    elif kind == "garbage header":
        db.write_bytes(os.urandom(8192))
    elif kind == "half-truncated":
        healthy_database(db)
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    elif kind == "another program's":
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE bookmarks (url TEXT)")
        conn.commit()
        conn.close()
    elif kind == "newer schema":
        healthy_database(db)
        conn = sqlite3.connect(db)
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
        conn.close()
    elif kind == "corrupt page":
        healthy_database(db)
        data = bytearray(db.read_bytes())
        page = 4096
        middle = (len(data) // page // 2) * page
        data[middle: middle + 100] = b"\xff" * 100  # the page's header: no valid b-tree page type
        db.write_bytes(bytes(data))


KINDS = ["empty", "garbage header", "half-truncated", "another program's", "newer schema", "corrupt page"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_unusable_database_is_refused_with_one_line(ns: str, tmp_path: Path, kind: str) -> None:
    cfg = config(tmp_path)
    db = tmp_path / "db" / "state.db"
    make(kind, db)
    before = db.read_bytes()
    code, err, took = run(ns, cfg)
    assert code == 1 and took < 15, (code, took, err)
    lines = [line for line in err.splitlines() if line.startswith("gatewayd:")]
    assert len(lines) == 1 and str(db) in lines[0], err
    assert "Traceback" not in err
    assert db.read_bytes() == before  # never replaced
    assert "10.0.0.2" in nft(ns, "list", "set", "inet", TABLE, "quarantine4")  # the kernel left as it was


def test_a_read_only_database_directory_is_refused(ns: str, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    db = tmp_path / "db" / "state.db"
    healthy_database(db)
    subprocess.run(["mount", "--bind", str(db.parent), str(db.parent)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(db.parent)], check=True)
        code, err, took = run(ns, cfg)
    finally:
        subprocess.run(["umount", str(db.parent)], check=False)
    assert code == 1 and took < 15 and str(db) in err and "Traceback" not in err, err


def test_init_store_moves_an_empty_file_aside_and_starts(ns: str, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    db = tmp_path / "db" / "state.db"
    make("empty", db)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "gatewayd", "run", "--config",
                             str(cfg), "--init-store"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert [p.name for p in db.parent.iterdir() if ".broken-" in p.name], list(db.parent.iterdir())
    assert db.stat().st_size > 0 and "moved aside" in err


def test_sigterm_during_start_up_ends_the_process(ns: str, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "gatewayd", "run", "--config",
                             str(cfg)], stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing and starting
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode in (0, -signal.SIGTERM), err


def test_a_native_queue_that_the_kernel_lacks_is_refused_with_one_line(ns: str, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text() + '[handshake]\nqueue = "nft"\n')
    code, err, _ = run(ns, cfg)
    if native_queue_supported():
        pytest.skip("this kernel has the native queue expression")
    assert code == 1 and err.strip().count("\n") == 0 and "CONFIG_NFT_QUEUE" in err, err


async def test_a_queue_number_another_process_holds_is_refused_with_one_line(ns: str, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with inside(ns):
        holder = HandshakeQueue(5182, lambda packets: None)
        holder.start()
    try:
        code, err, _ = await asyncio.to_thread(run, ns, cfg)
    finally:
        holder.close()
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("gatewayd: queue 5182 is already bound by another process"), err
