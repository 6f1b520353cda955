"""Relay rate: outbox delivery from smtpgate to smtp-sink with reused connections.

N forward mails (2 KB) are put straight into the outbox of a fresh store, then `smtpgate serve`
delivers them through SMTPGATE_RELAY_CONNECTIONS connections; the rate comes from the rows'
sent_at times (first to last delivery), so process start-up is not counted.

    .venv/bin/python bench/relay.py            # 3 rounds, medians
    .venv/bin/python bench/relay.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import time
from pathlib import Path

from _common import (
    Table,
    create_store,
    free_port,
    gateway_env,
    have_uvloop,
    machine,
    median,
    queue_counts,
    smtp_sink,
    start_gateway,
    tool,
    wait_for,
    wait_quiet,
    workdir,
)


def forward_bytes(i: int, size: int) -> bytes:
    head = (
        f"Resent-From: connector@localhost\r\nResent-To: support@msp.example\r\n"
        f"X-Smtpgate-Action: forwarded\r\nFrom: <someone@example.org>\r\n"
        f"To: <connector@localhost>\r\nSubject: relay bench {i}\r\n"
        f"Message-ID: <relay-{i}@bench>\r\n\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def fill_outbox(db: Path, n: int, size: int) -> None:
    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as c, c:
        for i in range(n):
            data = forward_bytes(i, size)
            cur = c.execute(
                "INSERT INTO outbox (inbound_id, kind, mail_from, recipients, message_id, size,"
                " created_at, next_attempt_at) VALUES (NULL, 'forward', ?, ?, ?, ?, ?, ?)",
                (
                    "connector@localhost",
                    json.dumps(["support@msp.example"]),
                    f"<relay-{i}@bench>",
                    len(data),
                    now,
                    now,
                ),
            )
            c.execute("INSERT INTO outbox_data (id, data) VALUES (?, ?)", (cur.lastrowid, data))


def run_round(
    loop: str, connections: int, args: argparse.Namespace, work: Path, rnd: int
) -> tuple[float, float]:
    sink, sink_port = smtp_sink(work)
    data = work / f"relay-{loop}-{connections}-{rnd}"
    env = gateway_env(data, free_port(), sink_port, relay_connections=str(connections))
    create_store(data)
    db = data / "smtpgate.db"
    fill_outbox(db, args.messages, args.size)
    wait_quiet()
    gw = start_gateway(env, loop, work)
    try:
        wait_for(
            lambda: queue_counts(db).get(("outbox", "done"), 0) >= args.messages,
            args.timeout,
            "every outbox row delivered",
        )
        cpu = gw.cpu_seconds()
    finally:
        gw.stop()
        sink.stop()
    with contextlib.closing(sqlite3.connect(db)) as c:
        first, last = c.execute("SELECT min(sent_at), max(sent_at) FROM outbox").fetchone()
        later = c.execute("SELECT count(*) FROM outbox WHERE sent_at > ?", (first,)).fetchone()[0]
        dead = c.execute("SELECT count(*) FROM outbox WHERE state = 'dead'").fetchone()[0]
    if dead:
        print(f"!! {dead} deliveries dead")
    return later / (last - first), cpu / args.messages * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--connections", default="1,4,8", help="SMTPGATE_RELAY_CONNECTIONS values")
    p.add_argument("--timeout", type=float, default=180)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    tool("smtp-sink")
    rounds = 1 if args.quick else args.rounds
    loops = ["asyncio", "uvloop"] if have_uvloop() else ["asyncio"]
    conns = [int(c) for c in args.connections.split(",")]
    print(f"machine: {machine()}")
    print(f"{args.messages} outbox mails of {args.size} B to smtp-sink; {rounds} round(s)")
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with workdir(args.keep) as work:
        for rnd in range(rounds):
            for loop in loops:
                for n in conns:
                    r = run_round(loop, n, args, work, rnd)
                    results.setdefault((loop, n), []).append(r)
                    print(
                        f"  round {rnd + 1} {loop:<8} {n} connection(s): {r[0]:6.0f} msg/s"
                        f"  CPU {r[1]:5.0f} us/msg"
                    )
    table = Table(["loop", "relay connections", "msg/s", "CPU us/msg (whole process)"])
    for (loop, n), rs in results.items():
        table.add(
            loop, str(n), f"{median([r[0] for r in rs]):.0f}", f"{median([r[1] for r in rs]):.0f}"
        )
    print()
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
