"""Memory: server peak RSS for one 25 MB message, for 50 concurrent sessions, and for 50
concurrent sessions each sending a message just under the 25 MiB limit — smtpgate (until the
messages are processed and relayed) next to the bare aiosmtpd server.

    .venv/bin/python bench/memory.py            # all scenarios
    .venv/bin/python bench/memory.py --quick    # skip the 50 x 25 MB scenario
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from _common import (
    Proc,
    Table,
    free_port,
    gateway_env,
    machine,
    queue_counts,
    smtp_sink,
    smtp_source,
    start_bare,
    start_gateway,
    tool,
    workdir,
)

BIG = 25_000_000  # under SMTPGATE_MAX_MESSAGE_BYTES (26,214,400) with headers and dot-stuffing


def sample_peak(proc: Proc, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(proc.rss_mb()[1])
        time.sleep(0.1)


def scenario(
    target: str, sessions: int, size: int, work: Path, relay_port: int, timeout: float
) -> tuple[float, float, float]:
    """(RSS before the load, peak RSS, seconds until stored (+ processed for smtpgate))."""
    if target == "bare":
        proc, port = start_bare("asyncio", work)
        data = None
    else:
        port = free_port()
        data = work / f"mem-{sessions}-{size}"
        proc = start_gateway(gateway_env(data, port, relay_port), "asyncio", work)
    time.sleep(0.5)
    before = proc.rss_mb()[0]
    peaks: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_peak, args=(proc, stop, peaks))
    sampler.start()
    t0 = time.perf_counter()
    try:
        try:
            smtp_source(port, sessions=sessions, messages=sessions, size=size, timeout=timeout)
        except RuntimeError as exc:  # smtp-source stops at the first refusal: say which
            print(f"   ({target}: {exc})")
            data = None
        if data is not None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # bounded wait for processing and relaying
                c = queue_counts(data / "smtpgate.db")
                if c.get(("inbound", "done"), 0) >= sessions and c.get(("outbox", "done"), 0) >= (
                    sessions
                ):
                    break
                time.sleep(0.2)
            else:
                print(f"   ({target}: not all processed within {timeout:.0f} s)")
        took = time.perf_counter() - t0
    finally:
        stop.set()
        sampler.join()
        peak = proc.rss_mb()[1]
        if target != "bare":
            peaks_each = ", ".join(f"{p:.0f}" for _, p in proc.rss_by_process())
            print(f"   ({target}: peak RSS MB of serve, then of each child: {peaks_each})")
        proc.stop()
    return before, max([peak, *peaks]), took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="skip 50 sessions x 25 MB")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--targets", default="bare,smtpgate")
    p.add_argument("--big-only", action="store_true", help="only 50 sessions x 25 MB")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    tool("smtp-source")
    print(f"machine: {machine()}")
    scenarios = [(1, BIG, "one 25 MB message"), (50, 2048, "50 sessions x 2 KB")]
    if not args.quick:
        scenarios.append((50, BIG, "50 sessions x 25 MB"))
    if args.big_only:
        scenarios = scenarios[-1:]
    table = Table(["load", "server", "RSS before MB", "peak RSS MB", "peak - before per session MB",
                   "seconds"])  # fmt: skip
    with workdir(args.keep) as work:
        relay, relay_port = smtp_sink(work)
        try:
            for sessions, size, label in scenarios:
                for target in args.targets.split(","):
                    before, peak, took = scenario(
                        target, sessions, size, work, relay_port, args.timeout
                    )
                    print(f"  {label:<22} {target:<9} before {before:5.0f} MB  peak {peak:6.0f} MB")
                    table.add(
                        label,
                        target,
                        f"{before:.0f}",
                        f"{peak:.0f}",
                        f"{(peak - before) / sessions:.1f}",
                        f"{took:.1f}",
                    )
        finally:
            relay.stop()
    print()
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
