"""What every benchmark shares: the root check, the JSON report (machine and time first), and py-spy."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_root() -> bool:
    """True as root; otherwise says why the benchmark cannot run."""
    if os.geteuid() == 0:
        return True
    print("the benchmark needs root (network namespaces, nftables, wireguard-go)", file=sys.stderr)
    return False


def write_report(out: Path, results: dict[str, Any]) -> None:
    """The results after the machine and the time, as JSON to `out` and to stdout."""
    report = {
        "machine": {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


class Spy:
    """py-spy (installed beside this Python; not a dependency of `make bench`) recording a process as raw
    collapsed stacks to `output`, from the moment `pid()` names one (so that a start-up can be included) until
    the block ends. Without `output`, nothing."""

    def __init__(self, pid: Callable[[], int | None], output: Path | None, rate: int = 250) -> None:
        self.pid, self.output, self.rate = pid, output, rate
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._attach, daemon=True)

    def __enter__(self) -> Spy:
        if self.output is not None:
            self._thread.start()
        return self

    def _attach(self) -> None:
        deadline = time.monotonic() + 30
        while (pid := self.pid()) is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if pid is not None:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                          "--format", "raw", "--output", str(self.output), "--rate",
                                          str(self.rate), "--nonblocking"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __exit__(self, *exc: object) -> None:
        if self.output is not None:
            self._thread.join(30)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)
            if self.output is not None and self.output.exists():
                summary = self.output.with_name(self.output.name.removesuffix(".raw") + ".summary.json")
                summary.write_text(json.dumps(flame_summary(self.output), indent=1) + "\n")


LOOP_ROOT = "_run_module_as_main"
"""The event loop's thread: the main thread's stacks start at the module run by `python -m gatewayd`."""


def flame_summary(raw: Path, top: int = 40) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks of the event loop's thread as shares of its samples: by function itself
    ("self"; a sample whose innermost Python frame is the loop's run is C code: uvloop and gRPC's asyncio server)
    and with what it calls ("inclusive")."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith(LOOP_ROOT):
            continue
        n = int(count)
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n

    def shares(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(n / max(1, total), 4)) for name, n in ranked]

    return {"thread": "event loop", "samples": total, "self": shares(own),
            "inclusive": shares({k: v for k, v in inclusive.items() if v < total})}
