"""SMTP abuse against a live gateway: smuggling, pipelined bursts, recipient and connection
limits, idle and slow clients, long lines and floods. The service for others must continue:
every test ends by checking that a normal message is still accepted and the store is writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import time
import unicodedata

import pytest

from smtpgate import front
from smtpgate.app import Gateway
from smtpgate.cli import TextFormatter
from tests.conftest import GatewayFactory, RecordingRelay, send, simple_message, wait_until
from tests.hostile import RawSession, Reply, SessionClosed, dot_stuff

IDLE_TIMEOUT = b"421 4.4.2 Idle timeout, closing connection\r\n"

SMUGGLER = "smuggler@evil.example"
SMUGGLED = (
    b"MAIL FROM:<" + SMUGGLER.encode() + b">\r\nRCPT TO:<connector@localhost>\r\nDATA\r\n"
    b"From: ceo@victim.example\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)


async def still_serving(gw: Gateway, what: str = "after abuse") -> None:
    """A normal message gets 250 and is processed; the store can be written."""
    assert gw.store is not None
    store = gw.store
    rcpt = (gw.settings.connector_addresses[0],)
    code, text = await send(gw.smtp_port, simple_message(subject=f"normal {what}"), rcpt=rcpt)
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[1]

    async def done() -> bool:
        row = await store.get_inbound(queue_id)
        return bool(row and row["state"] == "done")

    await wait_until(done, timeout=10, what=f"a normal message processed {what}")
    assert await store.can_write()


async def send_with_smuggled_transaction(gw: Gateway, marker: bytes) -> Reply:
    """One message from a@example.org whose data holds `marker` and then a whole second
    transaction, with the real end of data, all in one packet; returns the reply to the data.
    The session is still in order afterwards (NOOP 250): nothing smuggled is pending as commands.
    """
    session = await RawSession.open(gw.smtp_port)
    await session.start_data("a@example.org")
    await session.send_raw(b"Subject: innocent\r\n\r\nhello" + marker + SMUGGLED + b"\r\n.\r\n")
    reply = await session.reply()
    assert (await session.command(b"NOOP")).code == 250
    await session.close()
    return reply


async def inbound_senders(gw: Gateway) -> list[str]:
    assert gw.store is not None
    return [r["mail_from"] for r in await gw.store.list_inbound(limit=10_000)]


# Each variant hides an end-of-data inside the data; RFC 5321 2.3.8 allows only CRLF.CRLF.
SMUGGLING = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "lf-dot-cr-lf-split": b"\n.\r" + b"\n",
    "cr-lf-reversed": b"\n\r.\n\r",
    "bare-lf-in-header": b"\nX-Injected: yes\n",
}


@pytest.mark.parametrize("marker", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_variant_is_refused_and_nothing_is_queued(
    gateway: Gateway, marker: bytes
) -> None:
    reply = await send_with_smuggled_transaction(gateway, marker)
    assert reply.code == 550, reply
    assert "5.5.2" in reply.text
    assert await inbound_senders(gateway) == []
    await still_serving(gateway)
    assert SMUGGLER not in await inbound_senders(gateway)


@pytest.mark.parametrize(
    "marker",
    [b"\r\n .\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n..\r\n", b"\r\n.\t\r\n"],
    ids=["space-dot", "nul-dot", "dot-nul", "dot-dot", "dot-tab"],
)
async def test_near_end_of_data_markers_stay_inside_one_message(
    gateway: Gateway, marker: bytes
) -> None:
    """Lookalikes of CRLF.CRLF without bare CR/LF are ordinary data: one message, not two."""
    reply = await send_with_smuggled_transaction(gateway, marker)
    assert reply.code == 250, reply
    assert await inbound_senders(gateway) == ["a@example.org"]
    assert gateway.store is not None
    raw = await gateway.store.raw_message(str(reply.queue_id))
    assert raw is not None
    assert b"wire the money" in raw  # the "second message" is body text of the first


async def test_two_transactions_pipelined_in_one_packet_are_kept_apart(gateway: Gateway) -> None:
    first = (
        b"Subject: one\r\nMessage-ID: <one@p.example>\r\n\r\n.leading dot\r\nMAIL FROM:<x@y>\r\n"
    )
    second = b"Subject: two\r\nMessage-ID: <two@p.example>\r\n\r\nDATA\r\nQUIT\r\n"
    burst = b""
    for sender, data in (("one@p.example", first), ("two@p.example", second)):
        burst += f"MAIL FROM:<{sender}>\r\nRCPT TO:<connector@localhost>\r\nDATA\r\n".encode()
        burst += dot_stuff(data) + b".\r\n"
    burst += b"QUIT\r\n"
    session = await RawSession.open(gateway.smtp_port)
    await session.send_raw(burst)  # everything before reading a single reply
    codes = [(await session.reply()).code for _ in range(9)]
    await session.close()
    assert codes == [250, 250, 354, 250, 250, 250, 354, 250, 221]
    assert gateway.store is not None
    rows = sorted(await gateway.store.list_inbound(), key=lambda r: r["mail_from"])
    assert [r["mail_from"] for r in rows] == ["one@p.example", "two@p.example"]
    for row, data in zip(rows, (first, second), strict=True):
        raw = await gateway.store.raw_message(row["id"])
        assert raw is not None
        assert raw.endswith(data)  # exactly what was sent, after our Received: header
        assert raw.count(b"Received: ") == 1


async def test_commands_sent_with_data_before_354_are_message_content(gateway: Gateway) -> None:
    session = await RawSession.open(gateway.smtp_port)
    await session.send_raw(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<connector@localhost>\r\nDATA\r\n"
        b"Subject: early\r\n\r\nRSET\r\nMAIL FROM:<" + SMUGGLER.encode() + b">\r\n.\r\n"
    )
    codes = [(await session.reply()).code for _ in range(4)]
    await session.close()
    assert codes == [250, 250, 354, 250]
    assert await inbound_senders(gateway) == ["a@example.org"]


async def stored_recipients(gw: Gateway, session: RawSession) -> list[str]:
    """DATA with a simple message on a session whose recipients are given, asserted stored
    (250); the recipients stored for it."""
    assert (await session.command(b"DATA")).code == 354
    await session.send_raw(dot_stuff(simple_message()) + b".\r\n")
    reply = await session.reply()
    await session.close()
    assert reply.code == 250
    assert gw.store is not None
    row = await gw.store.get_inbound(str(reply.queue_id))
    assert row is not None
    return list(row["rcpt_tos"])


async def test_an_internationalized_connector_is_one_address_however_it_is_spelled(
    gateway_factory: GatewayFactory,
) -> None:
    """Its ASCII (punycode) domain and its decomposed spelling name the same mailbox; the
    message is stored for the connector as configured. Nothing else becomes one."""
    connector = "tickets@bücher.example"
    gw = await gateway_factory(connector_addresses=connector)
    spellings = [
        "tickets@xn--bcher-kva.example",
        unicodedata.normalize("NFD", "Tickets@Bücher.example"),
    ]
    for spelling in spellings:
        session = await RawSession.open(gw.smtp_port)
        assert (await session.command(b"MAIL FROM:<a@example.org> SMTPUTF8")).code == 250
        assert (await session.command(f"RCPT TO:<{spelling}>".encode())).code == 250, spelling
        for other in ("tickets@bucher.example", "tickets@xn--bcher-kva.example.evil"):
            assert (await session.command(f"RCPT TO:<{other}>".encode())).code == 550
        assert await stored_recipients(gw, session) == [connector]


async def test_more_recipients_than_allowed_get_452_and_the_message_keeps_the_rest(
    gateway_factory: GatewayFactory,
) -> None:
    connectors = [f"c{i}@localhost" for i in range(6)]
    gw = await gateway_factory(connector_addresses=",".join(connectors), max_recipients=3)
    session = await RawSession.open(gw.smtp_port)
    assert (await session.command(b"MAIL FROM:<a@example.org>")).code == 250
    codes = [(await session.command(f"RCPT TO:<{c}>".encode())).code for c in connectors]
    assert codes == [250, 250, 250, 452, 452, 452]
    # A thousand open-relay probes in the same transaction: each refused, none accepted.
    probes = b"".join(f"RCPT TO:<victim{i}@example.com>\r\n".encode() for i in range(1000))
    await session.send_raw(probes)
    replies = [await session.reply() for _ in range(1000)]
    assert {r.code for r in replies} == {550}
    assert await stored_recipients(gw, session) == connectors[:3]
    await still_serving(gw)


@pytest.mark.both_loops
async def test_connection_flood_gets_421_and_slots_come_back(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(max_connections=5)
    sessions = await asyncio.gather(*(RawSession.open(gw.smtp_port, ehlo=False) for _ in range(40)))
    greetings = sorted(s.greeting.code for s in sessions if s.greeting)
    assert greetings == [220] * 5 + [421] * 35
    for s in sessions:
        if s.greeting and s.greeting.code == 421:
            with pytest.raises(SessionClosed):
                await s.reply(5)  # and the refused connection is closed
    await asyncio.gather(*(s.close() for s in sessions))

    async def slot_free() -> bool:
        s = await RawSession.open(gw.smtp_port, ehlo=False)
        await s.close()
        return bool(s.greeting and s.greeting.code == 220)

    await wait_until(slot_free, timeout=10, what="a free slot after the flood")
    await still_serving(gw)


async def test_idle_client_is_dropped_and_frees_its_slot(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_connections=1, smtp_timeout=1.0)
    idle = await RawSession.open(gw.smtp_port)
    assert idle.greeting is not None
    assert idle.greeting.code == 220
    blocked = await RawSession.open(gw.smtp_port, ehlo=False)
    assert blocked.greeting is not None
    assert blocked.greeting.code == 421  # the idle client holds the only slot...
    await blocked.close()
    async with asyncio.timeout(15):  # ...until the server drops it, saying so (RFC 5321 4.2.2)
        assert await idle.reader.read() == IDLE_TIMEOUT
    await idle.close()
    await still_serving(gw, "after the idle client")


async def test_the_idle_timeout_counts_from_the_last_command(
    gateway_factory: GatewayFactory,
) -> None:
    """A session that sends a command every 0.6 timeouts outlives three timeouts; once it
    stops, it is dropped one timeout after its last command, not earlier, not much later."""
    gw = await gateway_factory(smtp_timeout=1.0)
    session = await RawSession.open(gw.smtp_port)
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        await asyncio.sleep(0.6)
        assert (await session.command(b"NOOP")).code == 250
    last = time.monotonic()
    async with asyncio.timeout(10):
        assert await session.reader.read() == IDLE_TIMEOUT
    idle = time.monotonic() - last
    await session.close()
    assert 0.9 <= idle <= 2.5, idle
    await still_serving(gw, "after the idle session")


async def test_slow_client_in_data_is_cut_off_and_nothing_is_queued(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(max_connections=2, smtp_timeout=1.5)
    slow = await RawSession.open(gw.smtp_port)
    await slow.start_data("slow@example.org")

    async def dribble() -> tuple[int, bool]:
        """The attack itself: a byte every few ms, never the end of data. True: cut off."""
        sent = 0
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                if slow.reader.at_eof():
                    return sent, True
                slow.writer.write(b"x" if sent % 60 else b"\r\n")
                await slow.writer.drain()
                sent += 1
                await asyncio.sleep(0.005)
        except (ConnectionError, OSError):
            return sent, True
        return sent, False

    dribbler = asyncio.create_task(dribble())
    # While it dribbles, others are served (the second slot).
    for i in range(5):
        code, _ = await send(gw.smtp_port, simple_message(subject=f"meanwhile {i}"))
        assert code == 250
    sent, cut_off = await dribbler
    assert cut_off, "the server let a client dribble DATA for 20 s"
    rest = b""
    with contextlib.suppress(ConnectionError):  # closed with a reset, or an orderly EOF
        async with asyncio.timeout(5):
            rest = await slow.reader.read()
    assert rest in (b"", IDLE_TIMEOUT), rest  # the 421 may be lost in the reset
    await slow.close()
    assert sent > 0
    assert "slow@example.org" not in await inbound_senders(gw)
    await still_serving(gw, "after the slow client")


async def test_a_slow_but_steady_upload_outlasts_the_idle_timeout(
    gateway_factory: GatewayFactory,
) -> None:
    """SMTPGATE_SMTP_TIMEOUT is an idle limit: a large message on a slow link that keeps
    sending (64 KiB or more per timeout) is not cut off, however long the whole upload takes."""
    gw = await gateway_factory(smtp_timeout=1.5)
    session = await RawSession.open(gw.smtp_port)
    await session.start_data("slow-link@example.org")
    await session.send_raw(b"Subject: big report\r\n\r\n")
    line = b"y" * 78 + b"\r\n"
    started = time.monotonic()
    for _ in range(15):  # 15 x 80 KiB, one piece every 0.3 s: ~4.5 s, three timeouts' worth
        await session.send_raw(line * 1024)
        await asyncio.sleep(0.3)
    reply = await session.command(b".")
    await session.close()
    assert time.monotonic() - started > 4.0
    assert reply.code == 250, reply
    assert "slow-link@example.org" in await inbound_senders(gw)


async def test_long_command_lines_are_refused_and_the_session_survives(gateway: Gateway) -> None:
    session = await RawSession.open(gateway.smtp_port)
    reply = await session.command(b"MAIL FROM:<" + b"a" * 10_000 + b"@example.org>")
    assert reply.code == 500
    assert "too long" in reply.text.lower()
    # 3 MB without a line end, then one: read in bounded pieces, answered once.
    await session.send_raw(b"NOOP " + b"n" * 3_000_000)
    reply = await session.command(b"")
    assert reply.code == 500
    assert (await session.command(b"NOOP")).code == 250
    assert (await session.command(b"EHLO " + b"h" * 100_000)).code == 500
    assert (await session.command(b"HELO ok.example")).code == 250
    await session.close()
    await still_serving(gateway)


async def test_pipelining_flood_is_answered_in_order_while_others_are_served(
    gateway: Gateway, relay: RecordingRelay
) -> None:
    n = 20_000
    flooder = await RawSession.open(gateway.smtp_port)
    await flooder.send_raw(b"NOOP\r\nRSET\r\n" * (n // 2))
    others = asyncio.gather(
        *(send(gateway.smtp_port, simple_message(subject=f"other {i}")) for i in range(5))
    )
    codes = [(await flooder.reply()).code for _ in range(n)]
    assert codes == [250] * n
    assert (await flooder.command(b"QUIT")).code == 221
    await flooder.close()
    assert [code for code, _ in await others] == [250] * 5
    await still_serving(gateway)


async def test_bogus_command_flood_is_cut_off(gateway: Gateway) -> None:
    flooder = await RawSession.open(gateway.smtp_port)
    await flooder.send_raw(b"XYZZY\r\n" * 10_000 + b"\x00\xff\xfe\r\n" * 100)
    replies = []
    with contextlib.suppress(SessionClosed, ConnectionError):
        for _ in range(10_100):
            replies.append(await flooder.reply(5))
    await flooder.close()
    assert len(replies) < 100  # dropped after a few, not answered ten thousand times
    assert replies[-1].code == 502
    await still_serving(gateway)


async def test_data_without_recipients_and_out_of_order_commands_queue_nothing(
    gateway: Gateway,
) -> None:
    session = await RawSession.open(gateway.smtp_port)
    assert (await session.command(b"DATA")).code == 503
    assert (await session.command(b"RCPT TO:<connector@localhost>")).code == 503
    assert (await session.command(b"MAIL FROM:<a@example.org>")).code == 250
    assert (await session.command(b"MAIL FROM:<b@example.org>")).code == 503
    assert (await session.command(b"DATA")).code == 503
    assert (await session.command(b"RCPT TO:<connector@evil.example>")).code == 550
    assert (await session.command(b"RCPT TO:connector@evil.example")).code in (501, 550)
    await session.close()
    assert await inbound_senders(gateway) == []
    await still_serving(gateway)


async def test_abrupt_disconnects_mid_data_queue_nothing(gateway: Gateway) -> None:
    for cut in (0, 1, 100, 5000):
        session = await RawSession.open(gateway.smtp_port)
        await session.start_data("cut@example.org")
        data = dot_stuff(simple_message(body="y" * 10_000))
        await session.send_raw(data[:cut] + (b"\r\n." if cut else b""))
        session.writer.transport.abort()  # RST, no end of data
    await still_serving(gateway)
    assert "cut@example.org" not in await inbound_senders(gateway)


@pytest.mark.parametrize(
    ("helo", "sender"),
    [
        (b"EHLO ok.example", b"MAIL FROM:<\xff\xfe@example.org>"),
        (b"EHLO \xff\xfe.example", b"MAIL FROM:<a@example.org>"),
        (b"EHLO ok.example", b"MAIL FROM:<\xed\xa0\x80@example.org> SMTPUTF8"),
        (b"HELO \xc3(", b"MAIL FROM:<\xc3(@example.org>"),
    ],
    ids=["sender-latin1", "helo-latin1", "sender-surrogate-utf8", "helo-and-sender-bad-utf8"],
)
async def test_non_utf8_envelope_gets_a_clear_answer_and_others_are_not_hurt(
    gateway_factory: GatewayFactory, helo: bytes, sender: bytes
) -> None:
    gw = await gateway_factory(store_timeout=5.0)
    hostile = await RawSession.open(gw.smtp_port, ehlo=False)
    assert (await hostile.command(helo)).code == 250
    reply = await hostile.command(sender)
    if reply.code == 250:
        assert (await hostile.command(b"RCPT TO:<connector@localhost>")).code == 250
        assert (await hostile.command(b"DATA")).code == 354
        # Sent together with normal mail from others, so they share a group commit.
        others = asyncio.gather(
            *(send(gw.smtp_port, simple_message(subject=f"other {i}")) for i in range(3))
        )
        await hostile.send_raw(dot_stuff(simple_message(subject="odd envelope")) + b".\r\n")
        reply = await hostile.reply()
        assert [code for code, _ in await others] == [250] * 3
    await hostile.close()
    # Accepted (bytes kept) or refused as a bad address; never a storage failure.
    assert reply.code in (250, 501, 550, 553), reply
    await still_serving(gw, "after a non-UTF-8 envelope")
    if reply.code == 250:
        assert gw.store is not None
        row = await gw.store.get_inbound(str(reply.queue_id))
        assert row is not None
        await wait_until(
            lambda: _done(gw, str(reply.queue_id)), what="the odd-envelope message processed"
        )


@pytest.mark.parametrize(
    "command",
    [b"RCPT TO:<ren\xe9@victim.example>", b"VRFY ren\xe9@victim.example"],
    ids=["rcpt", "vrfy"],
)
async def test_a_latin1_recipient_is_refused_cleanly_and_logged_as_utf8(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture, command: bytes
) -> None:
    """The refusal echoed the address as aiosmtpd decoded it (a lone surrogate for the byte):
    the reply could not be encoded, so the client got "500 Error: (UnicodeEncodeError) …" and
    the log an ERROR traceback per command, past every refusal-line cap; the INFO line held a
    lone surrogate, which JSON logs carried as "\\udce9" (strict parsers drop the line)."""
    caplog.set_level(logging.INFO)
    gw = await gateway_factory()
    session = await RawSession.open(gw.smtp_port)
    assert (await session.command(b"MAIL FROM:<a@example.org>")).code == 250
    reply = await session.command(command)
    await session.close()
    assert (reply.code, "Error" in reply.text) == (550, False), reply
    assert "<ren?@victim.example>" in reply.text, reply
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records if r.name == "smtpgate.front"]
    assert any("ren?@victim.example" in line for line in lines), lines
    for line in lines:
        line.encode("utf-8")  # no lone surrogate


async def _done(gw: Gateway, queue_id: str) -> bool:
    assert gw.store is not None
    row = await gw.store.get_inbound(queue_id)
    return bool(row and row["state"] == "done")


async def test_streaming_on_past_the_size_limit_is_cut_off_and_holds_nothing(
    gateway_factory: GatewayFactory,
) -> None:
    """Bytes past SMTPGATE_MAX_MESSAGE_BYTES are thrown away: they are no progress for the idle
    timer, however fast they come, and they hold none of the listener's data budget."""
    gw = await gateway_factory(max_message_bytes=4096, smtp_timeout=1.0)
    session = await RawSession.open(gw.smtp_port)
    await session.start_data("flood@example.org")
    started = time.monotonic()
    cut_off = False
    with contextlib.suppress(ConnectionError, OSError):
        while time.monotonic() - started < 8:  # 80 KiB/s: 64 KiB in every 0.8 s
            if session.reader.at_eof():
                cut_off = True
                break
            await session.send_raw((b"z" * 1022 + b"\r\n") * 16)
            await asyncio.sleep(0.2)
    cut_off = cut_off or session.reader.at_eof() or session.writer.is_closing()
    await session.close()
    assert cut_off, "a sender streaming past the size limit was never cut off"
    assert time.monotonic() - started < 6
    assert gw.data_budget.held == 0
    assert gw.data_budget.peak <= 4096 + 65536
    await still_serving(gw, "after the flood past the limit")


# --- a client that half-closes: everything sent, then shutdown(SHUT_WR) -------------------------

HALF_CLOSE_DIALOGUE = (
    b"EHLO script.example\r\nMAIL FROM:<monitor@rmm.example>\r\n"
    b"RCPT TO:<connector@localhost>\r\nDATA\r\n"
)


async def half_closing_client(port: int, data: bytes) -> list[str]:
    """Send everything at once, close the sending side (`printf … | nc -N`), read to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(15):
            replies = await reader.read()
    finally:
        writer.close()
    return replies.decode().splitlines()


@pytest.mark.both_loops
async def test_a_client_that_half_closes_after_its_message_gets_250_and_it_is_stored(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """aiosmtpd cancelled the session at the client's EOF: a fire-and-forget alert script got
    no 250 and its message was not stored. Now the commands already sent are worked off."""
    gw = await gateway_factory()
    body = b"Subject: disk low\r\nMessage-ID: <half@rmm.example>\r\n\r\nC: 2%\r\n.\r\nQUIT\r\n"
    replies = await half_closing_client(gw.smtp_port, HALF_CLOSE_DIALOGUE + body)
    queued = [line for line in replies if line.startswith("250 2.0.0 queued as ")]
    assert len(queued) == 1, replies
    assert replies[-1].startswith("221"), replies
    assert gw.store is not None
    assert await gw.store.get_inbound(queued[0].rsplit(" ", 1)[1]) is not None
    await relay.wait_for(1)


@pytest.mark.both_loops
async def test_a_client_that_half_closes_in_the_middle_of_data_stores_nothing(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory()
    replies = await half_closing_client(
        gw.smtp_port, HALF_CLOSE_DIALOGUE + b"Subject: cut\r\n\r\nno end of data\r\n"
    )
    assert replies[-1].startswith("354"), replies  # then the session just ends
    assert gw.store is not None
    assert await gw.store.list_inbound() == []
    await still_serving(gw)


# --- shutdown, and sessions that do not read -----------------------------------------------------


def stored_ids(gw: Gateway) -> list[str]:
    """The queue ids in the store file (also once the gateway has stopped)."""
    with contextlib.closing(sqlite3.connect(gw.settings.db_path)) as db:
        return [row[0] for row in db.execute("SELECT id FROM inbound")]


@pytest.mark.both_loops
async def test_shutdown_says_421_to_every_session_after_the_message_in_hand(
    gateway_factory: GatewayFactory,
) -> None:
    """RFC 5321 3.8: a session between commands gets 421 4.3.2 at once; one in DATA may finish
    its message (250, stored) and then gets 421. Both used to see the connection just drop."""
    gw = await gateway_factory()
    idle = await RawSession.open(gw.smtp_port)
    sending = await RawSession.open(gw.smtp_port)
    await sending.start_data("a@example.org")
    await sending.send_raw(b"Subject: in flight at shutdown\r\n\r\nfirst half\r\n")
    stopping = asyncio.create_task(gw.stop())
    reply = await idle.reply()
    assert (reply.code, reply.text[:5]) == (421, "4.3.2")
    await sending.send_raw(b"second half\r\n.\r\n")
    reply = await sending.reply()
    assert reply.code == 250
    assert (await sending.reply()).code == 421
    await idle.close()
    await sending.close()
    async with asyncio.timeout(15):
        await stopping
    assert stored_ids(gw) == [reply.queue_id]


@pytest.mark.parametrize("intake", [0, 1])
async def test_a_commit_in_flight_at_shutdown_is_answered_before_the_421(
    gateway_factory: GatewayFactory, intake: int
) -> None:
    """The message's commit waits for a lock when the shutdown begins: its sender gets the 250
    (it is stored), then 421. With the listener in `serve`, the store's close cancelled the
    commit half-way and the session got no answer at all; an intake child gave up after 5 s,
    below SMTPGATE_STORE_TIMEOUT."""
    gw = await gateway_factory(intake_processes=intake)
    session = await RawSession.open(gw.smtp_port)
    await session.start_data("a@example.org")
    blocker = sqlite3.connect(gw.settings.db_path, isolation_level=None)  # another writer
    blocker.execute("BEGIN IMMEDIATE")
    try:
        await session.send_raw(dot_stuff(simple_message()) + b".\r\n")
        await asyncio.sleep(0.3)  # the commit waits for the lock
        stopping = asyncio.create_task(gw.stop())
        await asyncio.sleep(0.3)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    reply = await session.reply()
    assert reply.code == 250
    assert (await session.reply()).code == 421
    await session.close()
    async with asyncio.timeout(15):
        await stopping
    assert stored_ids(gw) == [reply.queue_id]


async def test_a_connection_accepted_as_the_shutdown_begins_gets_421_too(
    gateway: Gateway,
) -> None:
    """A connection the loop accepted but had not yet started (connection_made comes a pass
    later) was missed by the shutdown's walk over the live sessions and outlived the store."""
    factory, sessions = front.listener_factory(
        gateway.settings,
        front.Handler(gateway.settings, gateway.store, lambda: None),
        None,
        lambda code: None,
    )
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    async with server:
        await sessions.shut_down(1.0)  # nothing live yet; the listener is still open here
        session = await RawSession.open(server.sockets[0].getsockname()[1], ehlo=False)
        await session.close()
    assert session.greeting is not None
    assert (session.greeting.code, session.greeting.text[:5]) == (421, "4.3.2")
    assert len(sessions) == 0


async def send_without_reading(port: int, payload: bytes) -> socket.socket:
    """A client that writes `payload` (as much as the server takes) and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    sent, stalled_since = 0, None
    while sent < len(payload):
        try:
            sent += sock.send(payload[sent : sent + 65536])
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or loop.time()
            if loop.time() - stalled_since > 0.5:
                break  # the server has stopped reading
            await asyncio.sleep(0.01)
    return sock


@pytest.mark.both_loops
async def test_a_client_that_never_reads_its_replies_loses_its_slot_at_the_idle_timeout(
    gateway_factory: GatewayFactory,
) -> None:
    """aiosmtpd's timeout closed the transport, which waits to send the unread replies: the
    session held its slot of SMTPGATE_MAX_CONNECTIONS for ever, and enough such clients
    shut out all mail."""
    gw = await gateway_factory(smtp_timeout=1, max_connections=1)
    # 5 MB of replies (HELP: 84 bytes for 6) fill the kernel's buffers (4 MB) and the
    # transport's: the session then waits to send, and reads no further command.
    hog = await send_without_reading(gw.smtp_port, b"EHLO hog.example\r\n" + b"HELP\r\n" * 60_000)
    try:

        async def slot_free() -> bool:
            session = await RawSession.open(gw.smtp_port, ehlo=False)
            await session.close()
            return session.greeting is not None and session.greeting.code == 220

        await wait_until(slot_free, timeout=15, what="the slot of a client that never reads")
    finally:
        hog.close()
    await still_serving(gw)


@pytest.mark.both_loops
async def test_a_pipelined_flood_lets_the_event_loop_serve_others_between_its_replies(
    gateway: Gateway,
) -> None:
    """aiosmtpd's command loop never waits while a client's commands are buffered: 20,000
    pipelined NOOPs were answered in one pass of the event loop, and other sessions, commits
    and workers waited for all of them (400,000 held the loop for 5-10 s)."""
    n = 20_000
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.smtp_port)
    passes = 0
    flood_answered = asyncio.Event()

    async def count_passes() -> None:
        nonlocal passes
        while not flood_answered.is_set():
            passes += 1
            await asyncio.sleep(0)

    try:
        assert (await reader.readline()).startswith(b"220")
        counter = asyncio.create_task(count_passes())
        writer.write(b"EHLO flood.example\r\n" + b"NOOP\r\n" * n)
        await writer.drain()
        answered = 0
        async with asyncio.timeout(60):
            while answered < n:
                answered += await reader.readline() == b"250 2.0.0 OK\r\n"
        flood_answered.set()
        await counter
    finally:
        writer.close()
    assert passes >= n // front.REPLIES_PER_TURN // 2, passes
    await still_serving(gateway)


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smtpgate.front"]


async def test_every_refusal_is_one_log_line_naming_the_peer_and_a_flood_is_capped(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Relay probes (550), oversize senders (552), the connection cap and the idle timeout (421)
    were answered without a word in the log (aiosmtpd's logger is held at WARNING): relay
    probing and the senders hitting the limits could not be seen. Each refusal is now one INFO
    line; a session that pipelines a thousand probes logs a bounded number of them."""
    caplog.set_level("INFO", logger="smtpgate.front")
    gw = await gateway_factory(max_connections=1, max_message_bytes=2000, smtp_timeout=1.0)
    session = await RawSession.open(gw.smtp_port)
    assert (await session.command(b"MAIL FROM:<big@example.org> SIZE=5000")).code == 552
    assert (await session.command(b"MAIL FROM:<prober@example.org>")).code == 250
    assert (await session.command(b"RCPT TO:<victim@example.com>")).code == 550
    blocked = await RawSession.open(gw.smtp_port, ehlo=False)
    assert blocked.greeting is not None
    assert blocked.greeting.code == 421
    await blocked.close()
    async with asyncio.timeout(15):
        assert await session.reader.read() == IDLE_TIMEOUT
    await session.close()
    lines = refusal_lines(caplog)
    for reply in ("552 5.3.4", "550 5.1.1 <victim@example.com>", "421 4.7.0", "421 4.4.2"):
        said = [ln for ln in lines if reply in ln]
        assert len(said) == 1, (reply, lines)
        assert "127.0.0.1" in said[0]

    caplog.clear()
    prober = await RawSession.open(gw.smtp_port)
    assert (await prober.command(b"MAIL FROM:<prober@example.org>")).code == 250
    await prober.send_raw(b"".join(b"RCPT TO:<v%d@example.com>\r\n" % i for i in range(1000)))
    assert {(await prober.reply()).code for _ in range(1000)} == {550}
    await prober.close()
    lines = refusal_lines(caplog)
    assert len(lines) == front.REFUSALS_LOGGED, lines
    assert "not logged" in lines[-1]
    await still_serving(gw, "after the probes")


async def test_refusals_of_a_message_name_its_sender_and_floods_are_rate_limited(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The reply to the data comes after aiosmtpd has reset the envelope: a 451 or the
    smuggling 550 was logged without its sender. A connection flood is a new session each
    time, so the per-session cap did not bound it: 200 refused connections, 200 lines."""
    caplog.set_level("INFO", logger="smtpgate.front")
    gw = await gateway_factory(max_connections=1)
    session = await RawSession.open(gw.smtp_port)
    assert (await session.command(b"MAIL FROM:<smuggler@example.org>")).code == 250
    for n in range(front.REFUSALS_LOGGED):  # the session's refusal lines used up first
        assert (await session.command(b"RCPT TO:<v%d@example.com>" % n)).code == 550
    assert (await session.command(b"RSET")).code == 250
    await session.start_data("smuggler@example.org")
    await session.send_raw(b"Subject: s\r\n\r\nhello\n.\nmore\r\n.\r\n")
    assert (await session.reply()).code == 550
    # An attack is a warning whatever the caps, and names its sender; once a session (a
    # session pipelining 300 attempts wrote 300 warnings).
    for _ in range(5):
        await session.start_data("smuggler@example.org")
        await session.send_raw(b"Subject: s\r\n\r\nhello\n.\nmore\r\n.\r\n")
        assert (await session.reply()).code == 550
    said = [r for r in caplog.records if "smuggling" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]
    assert "from=<smuggler@example.org>" in said[0].getMessage()
    caplog.clear()
    flood = await asyncio.gather(
        *(RawSession.open(gw.smtp_port, ehlo=False) for _ in range(3 * front.REFUSALS_PER_SECOND))
    )
    await asyncio.gather(*(s.close() for s in flood))
    await session.close()
    lines = [ln for ln in refusal_lines(caplog) if "421 4.7.0" in ln]
    assert len(lines) <= front.REFUSALS_PER_SECOND * 2  # the burst may span two seconds
    await still_serving(gw, "after the flood")


async def test_what_a_client_sends_cannot_forge_log_lines(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A quoted local part may hold a CR (`"x\\<CR>INFO fake"@x.com`), a VRFY argument an ESC:
    written as they were, they forged a log line or drove the terminal of `docker logs`."""
    caplog.set_level("INFO", logger="smtpgate.front")
    session = await RawSession.open(gateway.smtp_port)
    assert (await session.command(b"MAIL FROM:<a@example.org>")).code == 250
    await session.command(b'RCPT TO:<"x\\\rINFO smtpgate: forged"@x.example>')
    await session.command(b"VRFY x\x1b[2J@x.example")
    # Invisible format characters too (a soft hyphen, a tag character).
    await session.command("RCPT TO:<a\u00adb\U000e0041@x.example>".encode())
    await session.close()
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    text = "\n".join(formatter.format(r) for r in caplog.records if r.name == "smtpgate.front")
    assert "refused" in text
    assert "\r" not in text
    assert "\x1b" not in text
    assert "\u00ad" not in text
    assert "\U000e0041" not in text
    assert "\\r" in text  # shown escaped


async def test_a_store_timeout_is_logged_as_such(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """`could not store a message from 127.0.0.1: ` ended in nothing: str(TimeoutError()) is
    empty, and `exc or "timeout"` took the exception."""
    gw = await gateway_factory(store_timeout=0.2)
    assert gw.store is not None
    lock = gw.store._write_lock
    async with lock.hold(urgent=True):  # the store cannot commit: every intake waits
        code, _ = await send(gw.smtp_port, simple_message(subject="waits"))
    assert code == 451
    said = [ln for ln in refusal_lines(caplog) if "could not store" in ln]
    assert len(said) == 1
    assert said[0].endswith("timed out after 0.2 s (SMTPGATE_STORE_TIMEOUT)"), said
    assert "from=<" in said[0]


async def test_vrfy_promises_nothing_for_an_address_that_would_be_refused(
    gateway: Gateway,
) -> None:
    """VRFY answered 252 "will accept message and attempt delivery" for any address (RFC 5321
    3.5.3), while RCPT refuses all but the connectors: relay scanners read it as open."""
    session = await RawSession.open(gateway.smtp_port)
    connector = gateway.settings.connector_addresses[0]
    assert (await session.command(f"VRFY <{connector}>".encode())).code == 252
    for probe in (b"VRFY <someone@evil.example>", b"VRFY postmaster"):
        reply = await session.command(probe)
        assert reply.code == 550, reply
    await session.close()
    await still_serving(gateway)


async def test_mail_from_is_answered_with_an_address_status_code(gateway: Gateway) -> None:
    """RFC 3463 3.2: X.1.0 is "other address status" — what MTAs (Postfix: "250 2.1.0 Ok")
    answer a MAIL FROM with; RCPT's 2.1.5 likewise. A generic 2.0.0 said nothing."""
    session = await RawSession.open(gateway.smtp_port)
    assert (await session.command(b"EHLO client.example")).code == 250
    reply = await session.command(b"MAIL FROM:<someone@example.com>")
    assert (reply.code, reply.text) == (250, "2.1.0 OK"), reply
    reply = await session.command(f"RCPT TO:<{gateway.settings.connector_addresses[0]}>".encode())
    assert (reply.code, reply.text.split()[0]) == (250, "2.1.5"), reply
    await session.close()


async def test_help_lists_only_the_commands_a_client_can_use(gateway: Gateway) -> None:
    """HELP listed AUTH (aiosmtpd's list), which EHLO does not offer and which would only be
    refused: a client reading HELP would try it."""
    session = await RawSession.open(gateway.smtp_port, ehlo=False)
    reply = await session.command(b"HELP")
    assert reply.code == 214, reply
    assert "AUTH" not in reply.text.split(), reply
    for command in ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY"):
        assert command in reply.text.split(), (command, reply)
    reply = await session.command(b"HELP mail")
    assert (reply.code, reply.text) == (214, "2.0.0 Syntax: MAIL FROM: <address>"), reply
    assert (await session.command(b"EHLO client.example")).code == 250
    reply = await session.command(b"HELP mail")
    assert reply.text == "2.0.0 Syntax: MAIL FROM: <address> [SP <mail-parameters>]", reply
    for topic in (b"HELP AUTH", b"HELP BOGUS"):
        reply = await session.command(topic)
        assert reply.code == 501, reply
        assert "AUTH" not in reply.text.split(), reply
    await session.close()
