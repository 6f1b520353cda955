"""SMTPGATE_INTAKE_PROCESSES: the SMTP listener in child processes over the same store.

Real parts only: the gateway with real `python -m smtpgate.intake` children on a loopback port,
the recording relay, the SQLite file; `smtpgate serve` as a subprocess for the parent-death case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from smtpgate import app, intake
from smtpgate.config import load_settings
from smtpgate.model import Envelope
from smtpgate.store import Store
from tests.conftest import (
    GatewayFactory,
    RecordingRelay,
    http_get,
    send,
    simple_message,
    wait_processed,
    wait_until,
)
from tests.hostile import RawSession
from tests.test_operations import metric_samples


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def test_messages_accepted_by_a_child_are_stored_processed_and_counted(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory(intake_processes=2, workers=2)
    assert gw.intake is not None
    pids = gw.intake.pids()
    assert len(pids) == 2
    assert os.getpid() not in pids
    assert all(alive(p) for p in pids)

    replies = await asyncio.gather(
        *(send(gw.smtp_port, simple_message(subject=f"m{i}")) for i in range(20))
    )
    assert [code for code, _ in replies] == [250] * 20
    # Unknown sender: every message is forwarded to internal support by the parent's workers.
    await wait_processed(gw, 20)
    await relay.wait_for(20)
    assert sorted(m.message["Subject"] for m in relay.messages) == sorted(
        f"m{i}" for i in range(20)
    )

    async def counted() -> bool:
        _, _, body = await http_get(gw.http_port, "/metrics")
        samples = metric_samples(body.decode())
        return (
            samples.get(("smtpgate_messages_received_total", ()), 0) == 20
            and samples.get(("smtpgate_smtp_replies_total", (("code", "250"),)), 0) >= 20 * 4
            and samples.get(("smtpgate_smtp_connections_total", ()), 0) == 20
        )

    await wait_until(counted, what="the children's counters in /metrics")


@pytest.mark.parametrize("intake_processes", [0, 1], ids=["in-process", "intake-process"])
async def test_relaying_and_oversize_are_refused_alike_by_either_listener(
    gateway_factory: GatewayFactory, intake_processes: int
) -> None:
    gw = await gateway_factory(intake_processes=intake_processes, max_message_bytes=4096)
    code, text = await send(gw.smtp_port, simple_message(), rcpt=("someone@elsewhere.example",))
    assert code == 550
    assert "5.1.1" in text
    code, text = await send(gw.smtp_port, simple_message(body="x" * 8000))
    assert code == 552
    assert "5.3.4" in text
    assert gw.store is not None
    assert (await gw.store.status())["inbound"]["queued"] == 0


async def test_the_first_message_wakes_the_workers_without_waiting_for_a_poll(
    gateway_factory: GatewayFactory, relay: RecordingRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers that only polled would not look for an hour: the commit itself must wake them.
    monkeypatch.setattr(app, "WORKER_POLL_SECONDS", 3600.0)
    gw = await gateway_factory(intake_processes=1)
    await asyncio.sleep(0.2)  # the workers have looked once, found nothing, and now wait
    assert (await send(gw.smtp_port, simple_message()))[0] == 250
    await relay.wait_for(1)


async def test_a_child_that_dies_is_restarted_and_health_says_so_meanwhile(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory(intake_processes=1)
    assert gw.intake is not None
    (pid,) = gw.intake.pids()
    assert (await http_get(gw.http_port, "/healthz"))[0] == 200
    os.kill(pid, signal.SIGKILL)

    async def down() -> bool:
        code, _, body = await http_get(gw.http_port, "/healthz")
        return code == 503 and b"intake" in body

    await wait_until(down, what="/healthz 503 while the child is down")

    async def replaced() -> bool:
        assert gw.intake is not None
        return gw.intake.running() and gw.intake.pids() != [pid]

    await wait_until(replaced, what="a new intake process")
    assert (await http_get(gw.http_port, "/healthz"))[0] == 200
    assert (await send(gw.smtp_port, simple_message(subject="after restart")))[0] == 250
    await relay.wait_for(1)
    assert relay.messages[0].message["Subject"] == "after restart"


async def test_a_hangup_signal_to_the_whole_service_leaves_the_children_serving(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """SIGHUP to every process of the service (`systemctl kill -s HUP`, the terminal of the
    README's first command closed) ended the intake child, which has no rules to reload: its
    open sessions were cut without an answer."""
    gw = await gateway_factory(intake_processes=1)
    assert gw.intake is not None
    (pid,) = gw.intake.pids()
    session = await RawSession.open(gw.smtp_port)
    os.kill(pid, signal.SIGHUP)
    reply = await session.send_message(simple_message(subject="across a hangup"))
    await session.close()
    assert reply.code == 250, reply
    assert gw.intake.pids() == [pid]
    await relay.wait_for(1)


async def test_stop_ends_the_children(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(intake_processes=2)
    assert gw.intake is not None
    pids = gw.intake.pids()
    await gw.stop(grace=2)
    assert not any(alive(p) for p in pids)


async def test_children_leave_when_serve_is_killed_and_a_new_serve_takes_the_port(
    tmp_path: Path, relay: RecordingRelay
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    env.update(
        SMTPGATE_DATA_DIR=str(tmp_path / "data"),
        SMTPGATE_SMTP_PORT="0",
        SMTPGATE_HTTP_PORT="0",
        SMTPGATE_RELAY_PORT=str(relay.port),
        SMTPGATE_CONNECTOR_ADDRESSES="connector@localhost",
        SMTPGATE_INTAKE_PROCESSES="1",
    )

    async def serve() -> tuple[asyncio.subprocess.Process, int]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smtpgate", "serve", env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"SMTP on" not in (line := await proc.stderr.readline()):
                assert line, "serve exited before it was ready"
        port = int(line.split(b"SMTP on ", 1)[1].split(b",", 1)[0].rsplit(b":", 1)[1])
        return proc, port

    proc, port = await serve()
    try:
        (child,) = children(proc.pid)
        assert (await send(port, simple_message(subject="before the kill")))[0] == 250
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL

        async def child_gone() -> bool:
            return not alive(child)

        await wait_until(child_gone, what="the orphaned intake process to exit")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    env["SMTPGATE_SMTP_PORT"] = str(port)  # the same port: nothing of the old serve holds it
    proc, port2 = await serve()
    try:
        assert port2 == port
        assert (await send(port, simple_message(subject="after the kill")))[0] == 250
        await relay.wait_for(2)
        subjects = sorted(m.message["Subject"] for m in relay.messages)
        assert subjects == ["after the kill", "before the kill"]
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0


async def test_the_session_limit_holds_for_a_child(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(intake_processes=1, max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", gw.smtp_port) for _ in range(2)]
    try:
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.smtp_port)
        assert (await reader.readline()).startswith(b"421 4.7.0")
        writer.close()
    finally:
        for _, w in held:
            w.close()


def test_the_setting_is_bounded() -> None:
    from pydantic import ValidationError

    from smtpgate.config import Settings

    with pytest.raises(ValidationError, match="intake_processes"):
        Settings(intake_processes=17, _env_file=None)  # type: ignore[call-arg]
    # Each child needs a session of its own.
    with pytest.raises(ValidationError, match="SMTPGATE_MAX_CONNECTIONS"):
        Settings(intake_processes=3, max_connections=2, _env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "settings",
    [
        # Each child validated the parent's settings with its own share of the limit but the
        # total count of processes: 3 over 2 ([2, 1]) crash-looped the second child.
        {"intake_processes": 2, "max_connections": 3},
        # The relay password is kept from the children; the user was not, and "set together"
        # refused it (in `serve` the inherited environment happened to supply the password).
        {"intake_processes": 1, "relay_username": "u", "relay_password": "p"},
    ],
    ids=["uneven-shares", "relay-login"],
)
async def test_children_start_with_settings_the_parent_accepted(
    gateway_factory: GatewayFactory, settings: dict[str, Any]
) -> None:
    gw = await asyncio.wait_for(gateway_factory(**settings), 30)
    code, _ = await asyncio.wait_for(send(gw.smtp_port, simple_message(subject="hi")), 20)
    assert code == 250


@pytest.mark.parametrize(("limit", "count"), [(200, 3), (1, 1), (2, 2), (7, 4), (16, 16)])
def test_the_session_limit_is_shared_out_exactly(limit: int, count: int) -> None:
    """SMTPGATE_MAX_CONNECTIONS is for the whole gateway: each child's share was rounded up
    (200 with 3 children allowed 201, 1 with 2 allowed 2)."""
    shares = intake.session_shares(limit, count)
    assert len(shares) == count
    assert sum(shares) == limit
    assert max(shares) - min(shares) <= 1
    assert min(shares) >= 1


async def test_a_large_message_reaches_the_store_byte_for_byte(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(intake_processes=1)
    body = "".join(f"line {i:07d} " + "x" * 60 + "\n" for i in range(40_000))  # ~3 MB
    data = simple_message(subject="big", body=body)
    code, text = await send(gw.smtp_port, data)
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[1]
    assert gw.store is not None
    with sqlite3.connect(gw.store.path) as db:
        (raw,) = db.execute("SELECT raw FROM inbound_raw WHERE id = ?", (queue_id,)).fetchone()
    received, _, rest = bytes(raw).partition(b"\r\n\t")  # our Received: header first
    assert received.startswith(b"Received: from ")
    assert rest.split(b"\r\n", 2)[2] == data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@contextlib.asynccontextmanager
async def channel_pair() -> AsyncIterator[
    tuple[asyncio.StreamWriter, asyncio.StreamReader, list[bytes]]
]:
    """A writer over a socket pair (its writes recorded) and a reader of the other end."""
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_unix_connection(sock=ours)
    reader, peer = await asyncio.open_unix_connection(sock=theirs)
    transport = writer.transport
    writes: list[bytes] = []
    write = transport.write

    def spy(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        write(data)

    transport.write = spy  # type: ignore[method-assign]
    try:
        yield writer, reader, writes
    finally:
        writer.close()
        peer.close()


@contextlib.asynccontextmanager
async def parent_side(
    tmp_path: Path, on_queued: Callable[[], None] = lambda: None
) -> AsyncIterator[tuple[intake.IntakeProcesses, Store, list[bytes], asyncio.StreamReader]]:
    """The serve side of one child's channel, over a real store; no child process."""
    settings = load_settings(
        _env_file=None, data_dir=tmp_path, internal_support_address="support@msp.example"
    )
    store = await Store.open(tmp_path / "smtpgate.db")
    try:
        async with channel_pair() as (writer, reader, writes):
            processes = intake.IntakeProcesses(settings, [], store, on_queued, lambda code, n: None)
            processes._children[0].channel = writer
            yield processes, store, writes, reader
    finally:
        await store.close()


def child_enqueue(
    processes: intake.IntakeProcesses, store: Store, qid: str
) -> asyncio.Future[None]:
    """What the parent does with a child's enqueue frame."""
    envelope = Envelope("127.0.0.1", "client.test", "a@example.org", ("connector@localhost",))
    future = store.enqueue_nowait(envelope, b"Subject: x\r\n\r\nx\r\n", None, qid)
    processes._children[0].commits[qid] = future
    return future


async def test_the_answers_to_one_group_commit_leave_in_one_write_as_it_ends(
    tmp_path: Path,
) -> None:
    """In the pass of the event loop where the commit ends: before the futures' waiters run
    (a task per message took two more passes, each as long as the workers' steps then)."""
    async with parent_side(tmp_path) as (processes, store, writes, reader):
        futures = [child_enqueue(processes, store, qid) for qid in ("a", "b", "c")]
        await asyncio.gather(*futures)
        assert writes == [b'{"ok": "a"}\n{"ok": "b"}\n{"ok": "c"}\n']
        assert [await reader.readline() for _ in range(3)] == writes[0].splitlines(keepends=True)
        assert processes._children[0].commits == {}


async def test_a_failed_commit_is_answered_and_a_cancelled_one_is_not(tmp_path: Path) -> None:
    async with parent_side(tmp_path) as (processes, store, writes, _):
        await store._db.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON inbound WHEN new.id = 'bad'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        bad = child_enqueue(processes, store, "bad")
        gone = child_enqueue(processes, store, "gone")
        processes._children[0].commits.pop("gone").cancel()  # the child's cancel frame
        with pytest.raises(sqlite3.Error):
            await bad
        assert gone.cancelled()
        (line,) = b"".join(writes).splitlines()
        assert json.loads(line) == {"failed": "bad", "error": "refused"}
        ok = child_enqueue(processes, store, "ok")
        await ok
        assert b"".join(writes).splitlines()[-1] == b'{"ok": "ok"}'
        assert await store.get_inbound("gone") is None


async def test_a_failure_while_answering_does_not_silence_the_child(tmp_path: Path) -> None:
    """A failing metrics callback: every committed message is answered all the same."""
    calls: list[None] = []

    def on_queued() -> None:
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("metrics broke")

    async with parent_side(tmp_path, on_queued) as (processes, store, writes, _):
        await asyncio.gather(*(child_enqueue(processes, store, qid) for qid in ("a", "b", "c")))
        assert writes == [b'{"ok": "a"}\n{"ok": "b"}\n{"ok": "c"}\n']
        await child_enqueue(processes, store, "d")
        assert writes[-1] == b'{"ok": "d"}\n'


@pytest.mark.parametrize(("size", "count"), [(2048, 1), (64 * 1024, 1), (64 * 1024 + 1, 2)])
async def test_a_message_goes_to_the_parent_with_its_frame_in_one_write_up_to_64_kib(
    size: int, count: int
) -> None:
    async with channel_pair() as (writer, reader, writes):
        queue = intake._ParentQueue(writer)
        raw = b"x" * size
        envelope = Envelope("127.0.0.1", "client.test", "a@example.org", ("support@example.net",))
        sending = asyncio.create_task(queue.enqueue(envelope, raw, "<m@example.org>", "QID1"))
        frame = json.loads(await reader.readline())
        assert frame["enqueue"] == "QID1"
        assert await reader.readexactly(frame["size"]) == raw
        queue.answered({"ok": "QID1"})
        await sending
        assert len(writes) == count


async def test_a_long_sender_after_many_ehlos_does_not_kill_the_intake_process(
    gateway_factory: GatewayFactory,
) -> None:
    """aiosmtpd raised a process-wide MAIL line limit by 36 at every EHLO: 2,000 pipelined
    EHLOs allowed a 72 KB MAIL FROM. Its enqueue frame was a JSON line over the serve process's
    64 KiB line limit, read as an unreadable frame: the child was killed with every session on
    it. Now the limit is the session's own and rises once; frame lines may be far longer."""
    gw = await gateway_factory(intake_processes=1)
    assert gw.intake is not None
    (pid,) = gw.intake.pids()
    session = await RawSession.open(gw.smtp_port)
    await session.send_raw(b"EHLO x.example\r\n" * 2000)
    for _ in range(2000):
        assert (await session.reply()).code == 250
    reply = await session.command(b"MAIL FROM:<" + b"a" * 70_000 + b"@example.org>")
    assert reply.code == 500, reply  # too long a line, as after a single EHLO
    await session.close()
    assert alive(pid)
    code, _ = await send(gw.smtp_port, simple_message(subject="after the long sender"))
    assert code == 250
    assert gw.intake.pids() == [pid]
