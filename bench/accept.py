"""Accept rate, side by side: smtp-source against smtp-sink (the C limit), a bare aiosmtpd server
(250 without storing) and smtpgate (durable: 250 only after an fsynced commit, relaying to
smtp-sink), on the asyncio loop and, when installed, on uvloop.

    .venv/bin/python bench/accept.py            # 3 rounds, medians
    .venv/bin/python bench/accept.py --quick    # 1 round (development)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import (
    Table,
    free_port,
    gateway_env,
    have_uvloop,
    machine,
    median,
    queue_counts,
    smtp_sink,
    smtp_source,
    start_bare,
    start_gateway,
    tool,
    wait_quiet,
    workdir,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round (development)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (-s)")
    p.add_argument("--messages", type=int, default=3000, help="messages per run (-m)")
    p.add_argument("--sizes", default="2048,102400", help="message lengths in bytes (-l)")
    p.add_argument("--reuse", action="store_true", help="several messages per connection (-d)")
    p.add_argument("--only", default="", help="comma-separated subset of the targets")
    p.add_argument(
        "--intake",
        default="0,1",
        help="SMTPGATE_INTAKE_PROCESSES values to measure smtpgate with (target smtpgate-iN)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()
    rounds = 1 if args.quick else args.rounds
    sizes = [int(s) for s in args.sizes.split(",")]
    tool("smtp-source")
    tool("smtp-sink")
    loops = ["asyncio", "uvloop"] if have_uvloop() else ["asyncio"]
    targets = ["smtp-sink"]
    targets += [f"bare/{lp}" for lp in loops]
    targets += [f"smtpgate-i{n}/{lp}" for n in args.intake.split(",") for lp in loops]
    if args.only:
        targets = [t for t in targets if t in args.only.split(",")]
    print(f"machine: {machine()}")
    print(
        f"smtp-source -s {args.sessions} -m {args.messages} -l SIZE"
        f"{' -d' if args.reuse else ''}; {rounds} round(s); targets: {', '.join(targets)}"
    )
    rates: dict[tuple[str, int], list[float]] = {}
    cpus: dict[tuple[str, int], list[float]] = {}
    with workdir(args.keep) as work:
        relay, relay_port = smtp_sink(work)
        try:
            for rnd in range(rounds):
                for size in sizes:
                    for target in targets:
                        rate, cpu = run_one(target, size, args, work, relay_port, rnd)
                        rates.setdefault((target, size), []).append(rate)
                        cpus.setdefault((target, size), []).append(cpu)
                        print(
                            f"  round {rnd + 1} {target:<19} {size:>7} B: {rate:8.0f} msg/s"
                            f"  server CPU {cpu:6.0f} us/msg"
                        )
        finally:
            relay.stop()
    table = Table(
        ["target", "size", "msg/s", "MB/s", "server CPU us/msg", "vs bare (same loop)", "vs sink"]
    )
    for size in sizes:
        sink = median(rates.get(("smtp-sink", size), []))
        for target in targets:
            r = median(rates[(target, size)])
            bare_key = f"bare/{target.split('/')[1]}" if "/" in target else ""
            bare = median(rates.get((bare_key, size), []))
            table.add(
                target,
                f"{size // 1024} KB",
                f"{r:.0f}",
                f"{r * size / 1e6:.1f}",
                f"{median(cpus[(target, size)]):.0f}",
                f"{r / bare:.2f}" if bare_key and bare == bare else "",
                f"{r / sink:.2f}" if sink == sink else "",
            )
    print()
    print(table.render())
    return 0


def run_one(
    target: str, size: int, args: argparse.Namespace, work: Path, relay_port: int, rnd: int
) -> tuple[float, float]:
    kind, _, loop = target.partition("/")
    wait_quiet()
    if kind == "smtp-sink":
        proc, port = smtp_sink(work)
    elif kind == "bare":
        proc, port = start_bare(loop, work)
    else:
        port = free_port()
        data = work / f"gw-{kind}-{loop}-{size}-{rnd}"
        intake = kind.removeprefix("smtpgate-i")
        env = gateway_env(data, port, relay_port, intake_processes=intake)
        proc = start_gateway(env, loop, work)
    cpu0 = proc.cpu_seconds()
    try:
        elapsed = smtp_source(
            port,
            sessions=args.sessions,
            messages=args.messages,
            size=size,
            reuse=args.reuse,
            timeout=600,
        )
        cpu = proc.cpu_seconds() - cpu0
        if kind.startswith("smtpgate"):
            counts = queue_counts(data / "smtpgate.db")
            stored = sum(n for (t, _), n in counts.items() if t == "inbound")
            if stored != args.messages:
                print(f"!! smtpgate stored {stored} of {args.messages} accepted messages")
                sys.exit(1)
    finally:
        out = proc.stop()
        time.sleep(0.2)
    if kind == "bare" and f"accepted {args.messages}" not in out:
        print(f"!! bare server: {out.strip()[-200:]}")
    return args.messages / elapsed, cpu / args.messages * 1e6


if __name__ == "__main__":
    sys.exit(main())
