"""The Debian package under a real systemd: `make deb`'s package is installed into a container booted by
systemd-nspawn (Debian systemd-container) from this machine's own root through an overlay (a tmpfs upper layer:
nothing of the host changes), with a private network namespace (gatewayd's nftables table is the container's).

Checked: what the package lays out (user, credentials directory, conffile, tools on PATH, the operator's
to-do list); `systemctl start` active only after READY (the table reconciled); the service as user gatewayd with
only CAP_NET_ADMIN; challenge worker processes with no capability at all, replaced when killed; JSON logs in
the journal; reload with a good and a bad file; the watchdog restarting a daemon
that stopped making progress; `systemctl stop` leaving the quarantine table; upgrade keeping the database and
the operator's config; remove keeping the state, purge removing it.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import kernel_missing, require_tools

pytestmark = pytest.mark.kernel
TOP = Path(__file__).resolve().parents[2]


class Container:
    def __init__(self, root: Path) -> None:
        self.root = root / "merged"
        self.base = root
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def boot(self, timeout: float = 60) -> None:
        for d in ("upper", "work", "merged"):
            (self.base / d).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir=/,upperdir={self.base / 'upper'},workdir={self.base / 'work'}", str(self.root)],
                       check=True)
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "--private-network", "--register=no", "--keep-unit",
             # A machine name is a host name: letters, digits, '-' (mkdtemp's names may hold '_').
             "-M", f"gwdpkg{secrets.token_hex(3)}", "--console=passive", "-b", "systemd.firstboot=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = subprocess.run(["pgrep", "-P", str(self.nspawn.pid)], capture_output=True, text=True,
                                      check=False).stdout.split()
            if children:
                self.init_pid = int(children[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if self.nspawn.poll() is not None:
                raise RuntimeError("systemd-nspawn exited")
            time.sleep(0.3)
        raise RuntimeError("the container's systemd did not come up")

    def run(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--", *argv],
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check)

    def show(self, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", "gatewayd").stdout.strip()

    def shutdown(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.init_pid:
                self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.send_signal(signal.SIGKILL)
                self.nspawn.wait(10)
        subprocess.run(["umount", str(self.root)], check=False)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if kernel_missing():
        pytest.skip("the package test needs the kernel")  # a failure in CI, through the kernel marker
    require_tools("systemd-nspawn", "dpkg-deb", package="systemd-container, dpkg")
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(["bash", str(TOP / "packaging" / "deb" / "build.sh"), str(out)], capture_output=True,
                           text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    deb = Path(built.stdout.strip().splitlines()[-1])
    assert deb.exists() and deb.name.startswith("gatewayd_") and deb.suffix == ".deb"
    return deb


@pytest.fixture(scope="module")
def container(package: Path) -> Iterator[Container]:
    base = Path(tempfile.mkdtemp(prefix="gwd-nspawn-"))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True)
    c = Container(base)
    try:
        c.boot()
        shutil.copy(package, c.root / "srv" / "gatewayd.deb")
        yield c
    finally:
        c.shutdown()
        subprocess.run(["umount", str(base)], check=False)
        base.rmdir()


def test_install_lays_out_user_credentials_config_and_tools(container: Container) -> None:
    installed = container.run("dpkg", "-i", "/srv/gatewayd.deb")
    assert "Missing now: secrets-key control.pem control.key client-ca.pem" in installed.stdout
    assert container.run("id", "-u", "gatewayd").stdout.strip().isdigit()
    assert container.sh("stat -c '%a %U' /etc/gatewayd/credentials").stdout.split() == ["700", "root"]
    assert container.sh("stat -c '%a %U %G' /etc/gatewayd/gatewayd.toml").stdout.split() == ["640", "root",
                                                                                             "gatewayd"]
    assert container.sh("dpkg-query -W -f='${Conffiles}' gatewayd").stdout.strip().startswith(
        "/etc/gatewayd/gatewayd.toml")
    # Byte-code written at install for the service's interpreter (the service cannot write it): every module of
    # gatewayd and of its dependencies is not compiled again at each start.
    compiled = container.sh("find /opt/gatewayd/lib -name '*.pyc' -path '*/gatewayd/__pycache__/*' "
                            "-o -name '*.pyc' -path '*/grpc/__pycache__/*'").stdout.split()
    assert any("/gatewayd/__pycache__/daemon." in f for f in compiled), compiled[:5]
    assert any("/grpc/__pycache__/__init__." in f for f in compiled), compiled[:5]
    assert container.run("gatewayctl", "--help").returncode == 0
    assert container.run("gatewayd-client", "--help").returncode == 0
    # Without its credentials the service does not start (and says so).
    assert container.run("systemctl", "start", "gatewayd", check=False).returncode != 0


def test_start_is_active_only_after_ready_as_gatewayd_with_only_net_admin(container: Container) -> None:
    container.sh("head -c 32 /dev/urandom > /etc/gatewayd/credentials/secrets-key; "
                 "for f in control.pem control.key client-ca.pem; do : > /etc/gatewayd/credentials/$f; done; "
                 "chmod 600 /etc/gatewayd/credentials/*; systemctl reset-failed gatewayd")
    container.run("systemctl", "start", "gatewayd")  # Type=notify: returns once READY=1 came
    assert container.show("ActiveState") == "active"
    assert "table inet gatewayd" in container.run("nft", "list", "tables").stdout  # reconciled before READY
    pid = container.show("MainPID")
    status = dict(line.split(":\t", 1) for line in container.run("cat", f"/proc/{pid}/status").stdout.splitlines()
                  if ":\t" in line)
    uid = container.run("id", "-u", "gatewayd").stdout.strip()
    assert status["Uid"].split()[0] == uid and status["Uid"].split()[1] == uid
    for cap in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[cap], 16) == 1 << 12, (cap, status[cap])  # CAP_NET_ADMIN only


def test_the_journal_has_the_json_logs(container: Container) -> None:
    lines = container.run("journalctl", "-u", "gatewayd", "-o", "cat", "--no-pager").stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r.get("msg", "").startswith("gatewayd gateway-1 ready") for r in records)
    assert all({"level", "logger", "msg"} <= r.keys() for r in records)


def test_challenge_workers_run_as_gatewayd_without_any_capability(container: Container) -> None:
    # The unit filters capset(2) and gives CAP_NET_ADMIN as an ambient capability: the workers must still end
    # with none (they clear the ambient set and execute themselves again) and serve the challenge port.
    container.sh("sed -i '/^\\[challenge\\]$/,/^\\[/ s/^listen = \\[\\]$/listen = [\"127.0.0.1:9443\"]/; "
                 "s/^workers = 0$/workers = 2/' /etc/gatewayd/gatewayd.toml")
    assert 'workers = 2' in container.run("cat", "/etc/gatewayd/gatewayd.toml").stdout
    container.run("systemctl", "restart", "gatewayd")
    pid = container.show("MainPID")
    children = container.run("pgrep", "-P", pid).stdout.split()
    assert len(children) == 2, children
    uid = container.run("id", "-u", "gatewayd").stdout.strip()
    for child in children:
        status = dict(line.split(":\t", 1) for line in
                      container.run("cat", f"/proc/{child}/status").stdout.splitlines() if ":\t" in line)
        assert status["Uid"].split()[:2] == [uid, uid]
        assert status["NoNewPrivs"].strip() == "1"
        for cap in ("CapEff", "CapPrm", "CapAmb"):
            assert int(status[cap], 16) == 0, (child, cap, status[cap])
        # The inheritable set cannot be emptied without capset; it grants nothing: no ambient set, no new
        # privileges (no file capabilities at execve), and the bounding set still CAP_NET_ADMIN only.
        assert int(status["CapInh"], 16) in (0, 1 << 12) and int(status["CapBnd"], 16) == 1 << 12
        assert "gatewayd.api.worker" in container.run("cat", f"/proc/{child}/cmdline").stdout
    probe = ("import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
             "c = grpc.insecure_channel('127.0.0.1:9443'); "
             "print(h.HealthCheckResponse.ServingStatus.Name(g.HealthStub(c).Check("
             "h.HealthCheckRequest(service='gatewayd.v1.ChallengeService'), timeout=10).status))")
    assert container.run("/opt/gatewayd/bin/python", "-c", probe).stdout.strip() == "SERVING"
    # A worker killed by its PID is replaced; the daemon keeps running.
    container.run("kill", "-KILL", children[0])
    deadline = time.monotonic() + 15
    while True:
        now = container.run("pgrep", "-P", pid, check=False).stdout.split()
        if len(now) == 2 and children[0] not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.3)
    assert container.show("MainPID") == pid and container.show("ActiveState") == "active"


def test_reload_takes_a_good_file_and_keeps_running_on_a_bad_one(container: Container) -> None:
    pid = container.show("MainPID")
    container.sh("sed -i 's/^max_failures = 10$/max_failures = 8/' /etc/gatewayd/gatewayd.toml")
    container.run("systemctl", "reload", "gatewayd")
    container.sh("printf '\\n[nonsense]\\nkey = 1\\n' >> /etc/gatewayd/gatewayd.toml")
    container.run("systemctl", "reload", "gatewayd")
    deadline = time.monotonic() + 10
    while "reload refused" not in container.run("journalctl", "-u", "gatewayd", "-o", "cat", "--no-pager").stdout:
        assert time.monotonic() < deadline, "the bad file's refusal was not logged"
        time.sleep(0.2)
    log = container.run("journalctl", "-u", "gatewayd", "-o", "cat", "--no-pager").stdout
    assert "nonsense: unknown key" in log
    assert container.show("ActiveState") == "active" and container.show("MainPID") == pid
    container.sh("sed -i '/^\\[nonsense\\]$/,$d' /etc/gatewayd/gatewayd.toml")


def test_the_watchdog_restarts_a_daemon_that_stopped_making_progress(container: Container) -> None:
    container.sh("mkdir -p /etc/systemd/system/gatewayd.service.d && printf '[Service]\\nWatchdogSec=3s\\n' "
                 "> /etc/systemd/system/gatewayd.service.d/test-watchdog.conf && systemctl daemon-reload && "
                 "systemctl restart gatewayd")
    pid, restarts = container.show("MainPID"), int(container.show("NRestarts"))
    container.run("kill", "-STOP", pid)  # wedged: no work gets through its driver, so no WATCHDOG=1
    deadline = time.monotonic() + 20
    while container.show("MainPID") in (pid, "0") or container.show("ActiveState") != "active":
        assert time.monotonic() < deadline, "the watchdog did not restart the daemon"
        time.sleep(0.3)
    assert int(container.show("NRestarts")) == restarts + 1
    assert "Watchdog timeout" in container.run("journalctl", "-u", "gatewayd", "--no-pager").stdout
    container.sh("rm -r /etc/systemd/system/gatewayd.service.d && systemctl daemon-reload")


def test_stop_leaves_the_quarantine_table(container: Container) -> None:
    container.run("systemctl", "stop", "gatewayd")
    assert container.show("ActiveState") == "inactive"
    table = container.run("nft", "list", "table", "inet", "gatewayd").stdout
    assert "set quarantine4" in table and "chain forward" in table


def test_upgrade_keeps_database_and_config_remove_keeps_state_purge_removes_it(container: Container) -> None:
    assert container.run("test", "-s", "/var/lib/gatewayd/state.db", check=False).returncode == 0
    container.sh("sed -i 's/^max_failures = 8$/max_failures = 7/' /etc/gatewayd/gatewayd.toml")
    container.run("dpkg", "-i", "--force-confold", "/srv/gatewayd.deb")  # the same version again: an upgrade
    assert "max_failures = 7" in container.run("cat", "/etc/gatewayd/gatewayd.toml").stdout
    assert container.run("test", "-s", "/var/lib/gatewayd/state.db", check=False).returncode == 0
    container.run("systemctl", "start", "gatewayd")
    assert container.show("ActiveState") == "active"
    container.run("dpkg", "-r", "gatewayd")
    assert container.show("ActiveState") == "inactive"
    assert container.run("test", "-s", "/var/lib/gatewayd/state.db", check=False).returncode == 0
    assert container.run("test", "-e", "/opt/gatewayd", check=False).returncode != 0  # byte-code included
    container.run("dpkg", "-P", "gatewayd")
    assert container.run("test", "-e", "/var/lib/gatewayd", check=False).returncode != 0
    assert container.run("id", "gatewayd", check=False).returncode != 0
