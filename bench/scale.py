"""Scale: account detection with 10 vs 100,000 accounts, and `smtpgate status` time and server
RSS with 1,000,000 messages in the queue table.

    .venv/bin/python bench/scale.py            # 3 rounds of detection, 1,000,000 queued rows
    .venv/bin/python bench/scale.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from _common import (
    Table,
    create_store,
    free_port,
    gateway_env,
    machine,
    median,
    smtp_sink,
    smtpgate_cli,
    start_gateway,
    tool,
    wait_quiet,
    workdir,
)

from smtpgate.config import Settings, parse_rules
from smtpgate.mail import parse_message
from smtpgate.pipeline import Context, decide
from smtpgate.store import Store

RULES = """
account_by_sender = true

[[detection]]
subject = "Alert"

[[account]]
search = "file_as"
after = "Alert for Site"
before = ","

[[account]]
search = "account_number"
after = "Account"
"""


def account_row(i: int) -> dict[str, str]:
    return {
        "file_as": f"Site {i:06d} Corp",
        "account_number": f"AC-{i:06d}",
        "email1": f"it@site{i:06d}.example",
        "email2": f"site{i:06d}.example",  # a bare domain: found by the sender's domain
    }


def alert(i: int, n_accounts: int) -> bytes:
    k = (i * 7919) % n_accounts
    subject = (
        f"Alert for Site Site {k:06d} Corp, Disk C: low",  # rule 1: between, exact
        f"Alert: backup failed Account AC-{k:06d} job 7",  # rule 2: after only, longest prefix
        "Alert: unknown customer, ping lost",  # by sender domain (From below)
    )[i % 3]
    return (
        f"From: Monitor <probe@site{k:06d}.example>\r\nTo: connector@localhost\r\n"
        f"Subject: {subject}\r\nMessage-ID: <scale-{i}@bench>\r\n\r\nbody {i}\r\n"
    ).encode()


async def import_accounts(n_accounts: int, work: Path) -> float:
    """A store holding n accounts (imported as operators do); return the seconds it took."""
    store = await Store.open(work / f"accounts-{n_accounts}" / "smtpgate.db")
    try:
        t0 = time.perf_counter()
        rows = [(i + 2, account_row(i)) for i in range(n_accounts)]
        for start in range(0, len(rows), 10000):
            await store.import_accounts(rows[start : start + 10000])
        return time.perf_counter() - t0
    finally:
        await store.close()


async def detection(counts: list[int], messages: int, work: Path) -> dict[int, tuple[float, float]]:
    """(median us, p99 us) per alert for parse + decide with each number of accounts, found
    accounts checked. The stores take turns alert by alert, so a busy moment of a shared
    machine costs each the same."""
    stores: dict[int, tuple[Store, Context]] = {}
    try:
        for n in counts:
            settings = Settings(data_dir=work / f"accounts-{n}", hostname="bench", _env_file=None)
            stores[n] = (await Store.open(settings.db_path), Context(settings, parse_rules(RULES)))
        times: dict[int, list[float]] = {n: [] for n in counts}
        found = dict.fromkeys(counts, 0)
        for i in range(messages):
            for n, (store, ctx) in stores.items():
                raw = alert(i, n)
                t = time.perf_counter()
                msg = parse_message(raw)
                d = await decide(raw, "alerts@externalsystem.com", msg, ctx, store)
                times[n].append(time.perf_counter() - t)
                found[n] += d.account is not None
    finally:
        for store, _ in stores.values():
            await store.close()
    out = {}
    for n in counts:
        if found[n] != messages:
            print(f"!! {n} accounts: only {found[n]} of {messages} alerts found an account")
        times[n].sort()
        out[n] = (statistics.median(times[n]) * 1e6, times[n][int(messages * 0.99)] * 1e6)
    return out


def fill_queue(db: Path, n: int) -> None:
    raw = (
        b"From: <someone@example.org>\r\nTo: <connector@localhost>\r\nSubject: queued\r\n\r\n"
        + b"X" * 200
        + b"\r\n"
    )
    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as c, c:
        c.executemany(
            "INSERT INTO inbound (id, received_at, mail_from, rcpt_tos, size, state,"
            " next_attempt_at) VALUES (?, ?, 'someone@example.org', ?, ?, 'queued', ?)",
            (
                (f"BENCH{i:010d}", now - n + i, json.dumps(["connector@localhost"]), len(raw),
                 now - n + i)
                for i in range(n)
            ),
        )  # fmt: skip
        c.executemany(
            "INSERT INTO inbound_raw (id, raw) VALUES (?, ?)",
            ((f"BENCH{i:010d}", raw) for i in range(n)),
        )


def queue_scale(rows: int, work: Path, runs: int) -> dict[str, float]:
    sink, sink_port = smtp_sink(work)
    data = work / "queue"
    env = gateway_env(data, free_port(), sink_port)
    create_store(data)
    t0 = time.perf_counter()
    fill_queue(data / "smtpgate.db", rows)
    fill = time.perf_counter() - t0
    out: dict[str, float] = {"fill_s": fill}
    status_times = []
    for _ in range(runs):
        wait_quiet()
        t = time.perf_counter()
        smtpgate_cli(["status", "--json"], env)
        status_times.append(time.perf_counter() - t)
    out["status_ms"] = median(status_times) * 1e3
    t = time.perf_counter()
    smtpgate_cli(["--help"], env)
    out["python_startup_ms"] = (time.perf_counter() - t) * 1e3

    async def in_process() -> float:
        store = await Store.open(data / "smtpgate.db")
        try:
            t = time.perf_counter()
            await store.status()
            return time.perf_counter() - t
        finally:
            await store.close()

    out["status_query_ms"] = asyncio.run(in_process()) * 1e3
    gw = start_gateway(env, "asyncio", work)
    try:
        samples = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # bounded: 15 s of serving a million-row queue
            time.sleep(0.5)
            samples.append(gw.rss_mb())
        out["rss_mb"] = samples[-1][0]
        out["peak_rss_mb"] = max(p for _, p in samples)
        out["status_ms_while_serving"] = 0.0
        t = time.perf_counter()
        smtpgate_cli(["status", "--json"], env)
        out["status_ms_while_serving"] = (time.perf_counter() - t) * 1e3
        url = f"http://127.0.0.1:{env['SMTPGATE_HTTP_PORT']}/status"
        http_times = []
        for _ in range(5):
            t = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as resp:
                resp.read()
            http_times.append(time.perf_counter() - t)
        out["http_status_ms"] = median(http_times) * 1e3
    finally:
        gw.stop()
        sink.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--accounts", default="10,100000")
    p.add_argument("--messages", type=int, default=3000, help="alerts decided per round")
    p.add_argument("--queue-rows", type=int, default=1_000_000)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    tool("smtp-sink")
    rounds = 1 if args.quick else args.rounds
    counts = [int(a) for a in args.accounts.split(",")]
    print(f"machine: {machine()}")
    with workdir(args.keep) as work:
        for n in counts:
            took = asyncio.run(import_accounts(n, work))
            print(f"  imported {n} accounts in {took:.1f} s ({n / took:.0f} rows/s)")
        det: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
        for rnd in range(rounds):
            wait_quiet()
            for n, r in asyncio.run(detection(counts, args.messages, work)).items():
                det[n].append(r)
                print(
                    f"  round {rnd + 1} {n:>7} accounts: parse+decide median {r[0]:5.0f} us,"
                    f" p99 {r[1]:6.0f} us"
                )
        table = Table(["accounts", "parse+decide median us", "p99 us", "vs fewest accounts"])
        base = median([r[0] for r in det[counts[0]]])
        for n in counts:
            m = median([r[0] for r in det[n]])
            table.add(
                str(n), f"{m:.0f}", f"{median([r[1] for r in det[n]]):.0f}", f"{m / base:.2f}"
            )
        print()
        print(table.render())
        print()
        q = queue_scale(args.queue_rows, work, max(3, rounds))
        print(
            f"{args.queue_rows:,} queued rows (filled in {q['fill_s']:.0f} s):\n"
            f"  smtpgate status (whole command, median): {q['status_ms']:.0f} ms\n"
            f"    of which Python start-up and imports (`smtpgate --help`): "
            f"{q['python_startup_ms']:.0f} ms; the store's queries: {q['status_query_ms']:.1f} ms\n"
            f"  smtpgate status while the server works the queue: "
            f"{q['status_ms_while_serving']:.0f} ms; GET /status from the server:"
            f" {q['http_status_ms']:.1f} ms\n"
            f"  server RSS after 15 s serving it: {q['rss_mb']:.0f} MB"
            f" (peak {q['peak_rss_mb']:.0f} MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
