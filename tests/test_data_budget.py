"""front.DataBudget: the listener holds a bounded amount of message data; senders wait (TCP)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import cast

import pytest

from smtpgate.app import Gateway
from smtpgate.front import DataBudget, Listener
from tests.conftest import GatewayFactory, send, simple_message, wait_processed, wait_until
from tests.hostile import RawSession


class Session:
    """Stands in for a Listener: records whether its socket is paused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.paused = False
        self.pauses = 0

    def hold_back(self, paused: bool) -> None:
        self.pauses += paused
        self.paused = paused


def sessions(budget: DataBudget, *names: str) -> list[Session]:
    out = [Session(n) for n in names]
    for s in out:
        budget.begin(cast(Listener, s))
    return out


def grow(budget: DataBudget, session: Session, size: int) -> None:
    budget.grow(cast(Listener, session), size)


def end(budget: DataBudget, session: Session) -> None:
    budget.end(cast(Listener, session))


def test_under_the_limit_nobody_waits() -> None:
    budget = DataBudget(100)
    a, b = sessions(budget, "a", "b")
    grow(budget, a, 50)
    grow(budget, b, 50)
    assert (a.paused, b.paused, budget.held) == (False, False, 100)
    end(budget, a)
    end(budget, b)
    assert budget.held == 0


def test_over_the_limit_only_the_first_to_begin_goes_on_then_the_next() -> None:
    budget = DataBudget(100)
    a, b, c = sessions(budget, "a", "b", "c")
    grow(budget, b, 60)
    grow(budget, c, 60)  # over: b and c wait, a (first in DATA) goes on
    assert [s.paused for s in (a, b, c)] == [False, True, True]
    grow(budget, a, 500)  # one message larger than the limit still gets through
    assert not a.paused
    end(budget, a)  # still over (120): b is first now and goes on, c waits
    assert [s.paused for s in (b, c)] == [False, True]
    end(budget, b)  # 60: under, everyone reads
    assert not c.paused
    assert budget.peak == 620


def test_a_session_beginning_while_over_waits_at_once() -> None:
    budget = DataBudget(100)
    (a,) = sessions(budget, "a")
    grow(budget, a, 150)
    (late,) = sessions(budget, "late")
    assert late.paused
    assert not a.paused
    end(budget, a)
    assert not late.paused


def test_a_paused_session_that_gets_data_is_paused_again() -> None:
    """asyncio's stream reader resumes a socket it paused itself: the budget pauses it again."""
    budget = DataBudget(100)
    a, b = sessions(budget, "a", "b")
    grow(budget, a, 150)
    grow(budget, b, 1)
    assert b.paused
    assert b.pauses == 2
    assert budget.held == 151


@pytest.mark.both_loops
async def test_concurrent_large_messages_wait_their_turn_and_all_are_stored(
    gateway_factory: GatewayFactory,
) -> None:
    gw: Gateway = await gateway_factory()
    limit = 1 << 20
    gw.data_budget.limit = limit  # 1 MiB for the listener, six messages of ~1.5 MB
    body = ("x" * 76 + "\n") * 20_000
    messages = [simple_message(f"big {i}", body=body, message_id=f"<big{i}@x>") for i in range(6)]
    replies = await asyncio.gather(*(send(gw.smtp_port, m) for m in messages))
    assert [code for code, _ in replies] == [250] * 6, replies
    await wait_processed(gw, 6)
    size = max(len(m) for m in messages)
    # Unbounded, the six would have been held at once (~9.6 MB). Bounded: the limit, the one
    # message that goes on, and what arrived before the pause took effect (socket buffers).
    assert gw.data_budget.peak < limit + 2 * size
    assert gw.data_budget.held == 0


@pytest.mark.both_loops
async def test_a_session_lost_in_the_middle_of_data_gives_its_bytes_back(
    gateway_factory: GatewayFactory,
) -> None:
    gw: Gateway = await gateway_factory()
    session = await RawSession.open(gw.smtp_port)
    await session.start_data("gone@example.org")
    await session.send_raw(b"Subject: half\r\n\r\n" + b"x" * 200_000)

    async def counted() -> bool:
        return gw.data_budget.held >= 200_000

    await wait_until(counted, what="the half message counted")
    session.writer.transport.abort()  # a reset, not a polite close
    await session.close()

    async def given_back() -> bool:
        return gw.data_budget.held == 0

    await wait_until(given_back, what="the bytes given back")
    code, _ = await send(gw.smtp_port, simple_message("after"))
    assert code == 250


@pytest.mark.parametrize("pipelined", [b"", b"QUIT\r\n"], ids=["alone", "quit-behind-it"])
async def test_a_message_at_the_limit_keeps_its_budget_until_answered(
    gateway_factory: GatewayFactory, pipelined: bytes
) -> None:
    """The listener's count of a DATA took in the end-of-data line and commands pipelined
    behind it: a message at the limit was taken for refused data, and its bytes left the
    budget while it was still held for its commit (the sessions paused could go on)."""
    limit = 100_000
    gw = await gateway_factory(max_message_bytes=limit)
    assert gw.store is not None
    store = gw.store
    head = b"Subject: at the limit\r\n\r\n"
    line = b"x" * 98 + b"\r\n"
    content = head + line * ((limit - len(head)) // len(line))
    content += b"y" * (limit - len(content) - 2) + b"\r\n"
    assert len(content) == limit  # accepted: the limit counts it so
    session = await RawSession.open(gw.smtp_port)
    blocker = sqlite3.connect(gw.settings.db_path, timeout=0)
    try:
        await session.start_data("edge@example.org")
        await session.send_raw(content)

        async def all_held() -> bool:
            return gw.data_budget.held >= limit

        await wait_until(all_held, what="the message's bytes in the budget")
        blocker.execute("BEGIN IMMEDIATE")  # the commit waits: the message is still held
        await session.send_raw(b".\r\n" + pipelined)

        async def committing() -> bool:
            return store._committing is not None

        await wait_until(committing, what="the message's commit begun")
        held_during_commit = gw.data_budget.held
        blocker.rollback()
        reply = await session.reply(timeout=20)
    finally:
        blocker.close()
        await session.close()
    assert reply.code == 250, reply
    assert held_during_commit >= limit
