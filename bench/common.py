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
