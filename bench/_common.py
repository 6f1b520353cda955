"""Shared helpers for the bench scripts: Postfix's test tools, processes, ports, medians, RSS.

Every load loop here is bounded: a fixed message count and a wall-clock timeout per run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
FIXTURES = ROOT / "tests" / "fixtures"

INSTALL_HINT = """\
bench: {tool} not found. It ships with Postfix (Debian/Ubuntu package `postfix`). Install it
without starting a mail server:

    apt-get update
    echo 'exit 101' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y postfix

(policy-rc.d stops the package from starting Postfix; the tools land in /usr/sbin.)"""


def tool(name: str) -> str:
    """Path of smtp-source / smtp-sink, or exit with how to install them."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/lib/postfix") / name) if p.exists()),
        None,
    )
    if found is None:
        sys.exit(INSTALL_HINT.format(tool=name))
    return found


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}: {proc.args!r}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                # Read the banner so the listener is really serving, then leave politely.
                with contextlib.suppress(OSError):
                    s.recv(256)
                    s.sendall(b"QUIT\r\n")
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Proc:
    """A child process started by a bench, stopped by its own pid (never by name)."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[int]:
        """The process and its children (smtpgate's intake processes, SMTPGATE_INTAKE_PROCESSES)."""
        pids = [self.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
            pids += [int(p) for p in children.split()]
        return pids

    def rss_mb(self) -> tuple[float, float]:
        """(current RSS, peak RSS) in MB from /proc, summed over the process and its children."""
        each = self.rss_by_process()
        return sum(cur for cur, _ in each), sum(peak for _, peak in each)

    def rss_by_process(self) -> list[tuple[float, float]]:
        """(current RSS, peak RSS) in MB of the process, then of each child."""
        out = []
        for pid in self.tree():
            cur = peak = 0.0
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        cur = int(line.split()[1]) / 1024
                    elif line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) / 1024
            out.append((cur, peak))
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its live children (all threads) so far."""
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 15.0) -> str:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    handle = log.open("wb")
    popen = subprocess.Popen(
        list(cmd),
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    handle.close()
    return Proc(popen, log)


def smtp_sink(workdir: Path, port: int | None = None) -> tuple[Proc, int]:
    """Postfix's smtp-sink: answers every command without storing (the C limit)."""
    port = port or free_port()
    cmd = [tool("smtp-sink")]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    proc = start([*cmd, "-4", f"127.0.0.1:{port}", "512"], workdir / f"sink-{port}.log")
    wait_port(port, proc=proc.popen)
    return proc, port


def smtp_source(
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    sender: str = "bench@load.example",
    rcpt: str = "connector@localhost",
    subject: str | None = None,
    reuse: bool = False,
    timeout: float = 300.0,
) -> float:
    """Run smtp-source once; return the wall-clock seconds it took (bounded by `timeout`)."""
    cmd = [tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-f", sender, "-t", rcpt]
    if subject:
        cmd += ["-S", subject]
    if reuse:
        cmd.append("-d")
    t0 = time.perf_counter()
    done = subprocess.run(
        [*cmd, f"127.0.0.1:{port}"], capture_output=True, timeout=timeout, check=False
    )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(
            f"smtp-source failed ({done.returncode}): {done.stderr.decode(errors='replace')[:500]}"
        )
    return elapsed


def gateway_env(
    data_dir: Path,
    smtp_port: int,
    relay_port: int,
    *,
    rules: Path | None = None,
    **extra: str,
) -> dict[str, str]:
    env = {
        "SMTPGATE_DATA_DIR": str(data_dir),
        "SMTPGATE_SMTP_PORT": str(smtp_port),
        "SMTPGATE_HTTP_PORT": str(free_port()),
        "SMTPGATE_RELAY_PORT": str(relay_port),
        "SMTPGATE_HOSTNAME": "gateway.bench",
        "SMTPGATE_CONNECTOR_ADDRESSES": "connector@localhost",
        "SMTPGATE_INTERNAL_SUPPORT_ADDRESS": "support@msp.example",
        "SMTPGATE_MAX_CONNECTIONS": "1000",
    }
    if rules is not None:
        env["SMTPGATE_RULES_FILE"] = str(rules)
    env.update({f"SMTPGATE_{k.upper()}": v for k, v in extra.items()})
    return env


_CREATE_STORE = """
import asyncio, sys
from pathlib import Path
from smtpgate.store import Store

async def main() -> None:
    store = await Store.open(Path(sys.argv[1]))
    await store.close()

asyncio.run(main())
"""


def create_store(data: Path) -> Path:
    """A new, migrated store in the data directory `data`, as serve makes at start (the queue
    verbs refuse a directory without one, and status only reads); returns its path."""
    db = data / "smtpgate.db"
    subprocess.run([PYTHON, "-c", _CREATE_STORE, str(db)], cwd=ROOT, timeout=120, check=True)
    return db


def smtpgate_cli(args: Sequence[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "smtpgate", *args],
        capture_output=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"smtpgate {' '.join(args)}: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


def start_gateway(env: dict[str, str], loop: str, workdir: Path) -> Proc:
    """`smtpgate serve` in its own process, on the asyncio or the uvloop event loop."""
    extra = os.environ.get("BENCH_GATEWAY_ARGS", "").split()
    proc = start(
        [PYTHON, str(BENCH / "run_gateway.py"), "--loop", loop, *extra],
        workdir / f"gateway-{env['SMTPGATE_SMTP_PORT']}.log",
        env,
    )
    wait_port(int(env["SMTPGATE_SMTP_PORT"]), proc=proc.popen)
    return proc


def start_bare(loop: str, workdir: Path, port: int | None = None) -> tuple[Proc, int]:
    port = port or free_port()
    proc = start(
        [PYTHON, str(BENCH / "bare_server.py"), "--port", str(port), "--loop", loop],
        workdir / f"bare-{port}.log",
    )
    wait_port(port, proc=proc.popen)
    return proc, port


def queue_counts(db: Path | sqlite3.Connection) -> dict[tuple[str, str], int]:
    """The trigger-maintained counters (a read-only look at the live store): through `db` when
    it is an open connection (cheap enough to poll every few milliseconds), else a new one."""
    if isinstance(db, sqlite3.Connection):
        return {(t, s): n for t, s, n in db.execute("SELECT tbl, state, n FROM queue_counts")}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as c:
        return queue_counts(c)


def wait_for(predicate: object, timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll `predicate()` until true or `timeout`; return the time it became true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def wait_quiet(max_wait: float = 20.0, idle_share: float = 0.75) -> float:
    """Other work on a shared machine skews every figure: wait (bounded) until the CPUs are
    at least `idle_share` idle over half a second; return the idle share last seen."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = _cpu_times()
        time.sleep(0.5)
        b1, t1 = _cpu_times()
        idle = 1 - (b1 - b0) / max(1, t1 - t0)
        if idle >= idle_share:
            return idle
        if time.monotonic() > deadline:
            print(f"   (machine still busy: {idle:.0%} idle after {max_wait:.0f}s; going on)")
            return idle
        time.sleep(1.0)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="smtpgate-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Table:
    """A plain text table printed at the end of a bench."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([c if isinstance(c, str) else f"{c}" for c in cells])

    def render(self) -> str:
        widths = [
            max(len(r[i]) for r in [self.header, *self.rows]) for i in range(len(self.header))
        ]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.header, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in self.rows]
        return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
