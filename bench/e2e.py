"""End-to-end rate: alert mail from smtp-source until every ticket is committed and every forward
relayed (to smtp-sink), next to smtpgate's own accept rate in the same run.

Half the alerts name a known account (tests/fixtures/accounts.csv: a ticket is created), half an
unknown site (forwarded untouched to the support address through the relay). Rules:
tests/fixtures/rules.toml.

    .venv/bin/python bench/e2e.py            # 3 rounds, medians
    .venv/bin/python bench/e2e.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import (
    FIXTURES,
    Table,
    free_port,
    gateway_env,
    have_uvloop,
    machine,
    median,
    queue_counts,
    smtp_sink,
    smtp_source,
    smtpgate_cli,
    start_gateway,
    tool,
    wait_for,
    wait_quiet,
    workdir,
)

SENDER = "alerts@externalsystem.com"
TICKET_SUBJECT = "Alert for Site Acme Corp, Disk C: low on free space"
FORWARD_SUBJECT = "Alert for Site Nowhere Ltd, Disk C: low on free space"


def run_round(
    target: str, args: argparse.Namespace, work: Path, relay_port: int, rnd: int
) -> dict[str, float]:
    intake, _, loop = target.removeprefix("i").partition("/")
    data = work / f"e2e-i{intake}-{loop}-{rnd}"
    port = free_port()
    env = gateway_env(
        data, port, relay_port, rules=FIXTURES / "rules.toml", intake_processes=intake
    )
    smtpgate_cli(["accounts", "import", str(FIXTURES / "accounts.csv")], env)
    gw = start_gateway(env, loop, work)
    wait_quiet()
    half: int = args.messages // 2
    db = data / "smtpgate.db"
    try:
        cpu0 = gw.cpu_seconds()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            jobs = [
                pool.submit(
                    smtp_source,
                    port,
                    sessions=args.sessions // 2,
                    messages=half,
                    size=args.size,
                    sender=SENDER,
                    subject=subject,
                    timeout=600,
                )
                for subject in (TICKET_SUBJECT, FORWARD_SUBJECT)
            ]
            for job in jobs:
                job.result()
        t_accept = time.perf_counter() - t0
        # One read-only connection polled every 5 ms: the time from the last acceptance to the
        # last effect (the tail) is tens of milliseconds, so a coarser poll would be most of it.
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as ro:
            backlog = queue_counts(ro).get(("inbound", "queued"), 0)

            def finished() -> bool:
                c = queue_counts(ro)
                processed = int(c.get(("inbound", "done"), 0) + c.get(("inbound", "dead"), 0))
                relayed = int(c.get(("outbox", "done"), 0) + c.get(("outbox", "dead"), 0))
                return processed >= 2 * half and relayed >= half

            t_done = (
                wait_for(finished, args.timeout, "every message processed and relayed", poll=0.005)
                - t0
            )
        cpu = gw.cpu_seconds() - cpu0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            tickets = c.execute("SELECT count(*) FROM tickets").fetchone()[0]
            dead = c.execute(
                "SELECT (SELECT count(*) FROM inbound WHERE state = 'dead')"
                " + (SELECT count(*) FROM outbox WHERE state = 'dead')"
            ).fetchone()[0]
            stored = c.execute("SELECT count(*) FROM inbound").fetchone()[0]
        if tickets != half or dead or stored != 2 * half:
            print(f"!! {loop}: {stored} stored, {tickets} tickets (want {half}), {dead} dead")
        _, peak = gw.rss_mb()
    finally:
        gw.stop()
    return {
        "accept": 2 * half / t_accept,
        "e2e": 2 * half / t_done,
        "backlog": backlog,
        "tail_ms": (t_done - t_accept) * 1000,
        "cpu_us": cpu / (2 * half) * 1e6,
        "rss": peak,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for processing")
    p.add_argument(
        "--intake", default="0,1", help="SMTPGATE_INTAKE_PROCESSES values to measure (iN/loop)"
    )
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    tool("smtp-source")
    rounds = 1 if args.quick else args.rounds
    loops = ["asyncio", "uvloop"] if have_uvloop() else ["asyncio"]
    print(f"machine: {machine()}")
    print(
        f"{args.messages} alerts of {args.size} B over {args.sessions} sessions "
        f"(half tickets, half forwards); {rounds} round(s)"
    )
    targets = [f"i{n}/{lp}" for n in args.intake.split(",") for lp in loops]
    results: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    with workdir(args.keep) as work:
        relay, relay_port = smtp_sink(work)
        try:
            for rnd in range(rounds):
                for target in targets:
                    r = run_round(target, args, work, relay_port, rnd)
                    results[target].append(r)
                    print(
                        f"  round {rnd + 1} {target:<10} accept {r['accept']:6.0f}/s"
                        f"  end-to-end {r['e2e']:6.0f}/s  backlog {r['backlog']:5.0f}"
                        f"  tail {r['tail_ms']:4.0f} ms"
                        f"  CPU {r['cpu_us']:5.0f} us/msg  peak RSS {r['rss']:.0f} MB"
                    )
        finally:
            relay.stop()
    table = Table(
        [
            "intake processes / loop",
            "accept msg/s",
            "end-to-end msg/s",
            "e2e / accept",
            "queued at end of load",
            "tail ms",
            "CPU us/msg",
            "peak RSS MB",
        ]
    )
    for target, rs in results.items():
        acc, e2e = median([r["accept"] for r in rs]), median([r["e2e"] for r in rs])
        table.add(
            target,
            f"{acc:.0f}",
            f"{e2e:.0f}",
            f"{e2e / acc:.2f}",
            f"{median([r['backlog'] for r in rs]):.0f}",
            f"{median([r['tail_ms'] for r in rs]):.0f}",
            f"{median([r['cpu_us'] for r in rs]):.0f}",
            f"{median([r['rss'] for r in rs]):.0f}",
        )
    print()
    print(table.render())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.TimeoutExpired as exc:
        sys.exit(f"bench: timed out: {exc}")
