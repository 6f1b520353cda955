"""Malformed and hostile mail against a live gateway: every message is accepted or refused with a
clear reply, every accepted one ends `done` with an outcome, and normal mail still flows after.

Also: hostile XML (API on) is refused, and refusing it costs bounded memory (measured in a fresh
process, since libxml2 allocates outside Python's tracemalloc).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from smtpgate.app import Gateway
from smtpgate.model import Action
from tests.conftest import (
    FIXTURES,
    GatewayFactory,
    RecordingRelay,
    send,
    simple_message,
    wait_until,
)
from tests.hostile import (
    CLEAR_REFUSALS,
    RawSession,
    Reply,
    SessionClosed,
    Specimen,
    as_xml_mail,
    corpus,
    hostile_xml,
    shuffled,
)

GENERATED = 440  # hypothesis-built messages; with the specimens the corpus holds > 500
SESSIONS = 4
MAX_BYTES = 3_000_000
ACTIONS = frozenset(a.value for a in Action)
REPO = Path(__file__).resolve().parent.parent


async def send_corpus(port: int, specimens: list[Specimen]) -> dict[str, Reply]:
    """Send over a few concurrent sessions; a session the server closes is reopened."""
    queue: asyncio.Queue[Specimen] = asyncio.Queue()
    for s in specimens:
        queue.put_nowait(s)
    replies: dict[str, Reply] = {}

    async def worker() -> None:
        session = await RawSession.open(port)
        try:
            while not queue.empty():
                spec = queue.get_nowait()
                try:
                    replies[spec.name] = await session.send_message(spec.data)
                except (SessionClosed, ConnectionError) as exc:
                    replies[spec.name] = Reply(0, f"connection lost: {exc}")
                    await session.close()
                    session = await RawSession.open(port)
                    continue
                if replies[spec.name].code == 421:
                    await session.close()
                    session = await RawSession.open(port)
        finally:
            await session.close()

    await asyncio.gather(*(worker() for _ in range(SESSIONS)))
    return replies


async def test_hostile_corpus_is_accepted_or_refused_and_every_accepted_message_ends_done(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory(
        rules=(FIXTURES / "rules.toml").read_text(),
        api_enabled=True,
        max_message_bytes=MAX_BYTES,
        workers=4,
    )
    assert gw.store is not None
    store = gw.store
    await store.import_accounts(
        [(1, {"file_as": "Acme Corp", "email1": "it@acme.example"}), (2, {"file_as": "Word"})]
    )
    specimens = corpus(GENERATED)
    specimens.append(
        Specimen("oversize", simple_message(body="x" * 76 + "\n") * (MAX_BYTES // 60), False)
    )
    assert len(specimens) >= 500
    assert len({s.name for s in specimens}) == len(specimens)

    replies = await send_corpus(gw.smtp_port, shuffled(specimens))

    accepted: dict[str, str] = {}
    wrong: list[str] = []
    for spec in specimens:
        reply = replies[spec.name]
        if spec.accepted and reply.code == 250 and reply.queue_id:
            accepted[spec.name] = reply.queue_id
        elif not spec.accepted and reply.code in CLEAR_REFUSALS and reply.text:
            continue
        else:
            wrong.append(f"{spec.name}: {reply.code} {reply.text[:100]}")
    assert not wrong, wrong
    refused = {s.name: replies[s.name].code for s in specimens if not s.accepted}
    assert refused["line-over-the-limit"] == 500
    assert refused["oversize"] == 552
    assert refused["bare-lf-in-body"] == 550

    async def all_finished() -> bool:
        s = await store.status()
        return bool(s["inbound"]["done"] + s["inbound"]["dead"] >= len(accepted))

    await wait_until(all_finished, timeout=45, what="the corpus processed")
    problems = []
    for name, queue_id in accepted.items():
        row = await store.get_inbound(queue_id)
        assert row is not None, name
        outcome = row["outcome"]
        if row["state"] != "done" or not outcome or outcome["action"] not in ACTIONS:
            problems.append(f"{name}: {row['state']} {row['last_error']} {outcome}")
    assert not problems, problems
    assert (await store.status())["inbound"]["dead"] == 0

    # The XML attacks were recognised as transaction attempts and refused, none applied.
    for name, _ in hostile_xml():
        row = await store.get_inbound(accepted[f"xml-{name}"])
        assert row is not None
        assert row["outcome"]["action"] == "xml_rejected", (name, row["outcome"])
    # Tickets exist only for the messages whose outcome says so: one each.
    ticket_outcomes = 0
    for qid in accepted.values():
        row = await store.get_inbound(qid)
        assert row is not None
        ticket_outcomes += row["outcome"]["action"] in ("automated_ticket", "ticket_created")
    assert (await store.status())["tickets"] == ticket_outcomes

    # Normal mail right after is processed promptly, and the gateway is healthy.
    code, text = await send(gw.smtp_port, simple_message(message_id="<after@example.org>"))
    assert code == 250
    queue_id = text.rsplit(" ", 1)[1]

    async def canary_done() -> bool:
        row = await store.get_inbound(queue_id)
        return bool(row and row["state"] == "done")

    await wait_until(canary_done, timeout=10, what="the message after the corpus")
    assert await store.can_write()
    print(
        f"\nhostile corpus: {len(specimens)} messages, {len(accepted)} accepted and done, "
        f"{len(specimens) - len(accepted)} refused, 0 dead"
    )


_XML_PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    from smtpgate.xmlapi import find_transaction
    from tests.hostile import hostile_xml
    attacks = hostile_xml()
    find_transaction([b"<CommitCRMTransaction/>"])  # warm up: imports and parser set up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for name, xml in attacks:
        started = time.perf_counter()
        tx = find_transaction([xml])
        elapsed = time.perf_counter() - started
        out[name] = {
            "codes": [e.code for e in tx.errors] if tx else None,
            "ms": round(elapsed * 1000, 1),
        }
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"results": out, "grown_kib": grown}))
    """
)


def test_hostile_xml_is_refused_in_bounded_memory() -> None:
    # A fresh interpreter: ru_maxrss is a high-water mark, meaningless in a busy test process.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _XML_PROBE],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=REPO,
        env=env,
        check=True,
    )
    report = json.loads(proc.stdout)
    results = report["results"]
    assert set(results) == {name for name, _ in hostile_xml()}
    for name, result in results.items():
        assert result["codes"], f"{name} was not refused: {result}"
        if "xxe" in name or "laughs" in name or "quadratic" in name or "dtd" in name:
            assert result["codes"] == [150012], (name, result)
        else:
            assert set(result["codes"]) <= {150001, 150002, 150009, 150010, 150012}, (name, result)
    # The largest attack document is ~1.1 MB; refusing all of them must not cost more than a
    # few copies of that (an entity expansion would cost gigabytes).
    assert report["grown_kib"] < 64 * 1024, report
    times = {k: v["ms"] for k, v in results.items()}
    print("\nhostile XML (ms):", times, "memory grown:", report["grown_kib"], "KiB")


async def test_xml_attacks_end_to_end_refused_and_normal_xml_still_applies(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw: Gateway = await gateway_factory(api_enabled=True)
    assert gw.store is not None
    store = gw.store
    await store.import_accounts([(1, {"rec_id": "CRDACME0000000000001", "file_as": "Acme Corp"})])
    session = await RawSession.open(gw.smtp_port)

    ids = []
    for name, xml in hostile_xml():
        reply = await session.send_message(as_xml_mail(name, xml))
        assert reply.code == 250, (name, reply)
        ids.append(reply.queue_id)
    good = as_xml_mail(
        "good",
        b"<CommitCRMTransaction><DataKind>TICKET</DataKind><RecordData>"
        b"<FLDTKTCARDID>CRDACME0000000000001</FLDTKTCARDID>"
        b"<FLDTKTPROBLEM>after the attacks</FLDTKTPROBLEM></RecordData></CommitCRMTransaction>",
    )
    reply = await session.send_message(good)
    await session.close()
    assert reply.code == 250

    async def done() -> bool:  # workers run side by side: the last one in is not the last out
        rows = [await store.get_inbound(str(q)) for q in (*ids, reply.queue_id)]
        return all(row and row["state"] == "done" for row in rows)

    await wait_until(done, timeout=20, what="the attacks and the good transaction")
    for queue_id in ids:
        row = await store.get_inbound(str(queue_id))
        assert row is not None
        assert row["state"] == "done"
        assert row["outcome"]["action"] == "xml_rejected"
    row = await store.get_inbound(str(reply.queue_id))
    assert row is not None
    assert row["outcome"]["action"] == "xml_applied"
    tickets = await store.list_tickets()
    assert [t["description"] for t in tickets] == ["after the attacks"]
