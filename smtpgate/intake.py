"""Intake processes (SMTPGATE_INTAKE_PROCESSES): the SMTP protocol work on a core of its own.

On one core, SMTP sessions and processing take turns: under an alert storm the queue grows while
sessions are being served (docs/performance.md). With intake processes, `serve` binds the SMTP
sockets itself (so the port is known, and held while a child restarts) and hands them to N child
processes (`python -m smtpgate.intake`) that run the same listener (front.Handler: recipient
policy, limits, the bare CR/LF check, the Received: header). A child does not open the store: it
passes each message to the serve process, whose one write connection commits it in its group
commit (one writer, no cross-process lock waits), and answers 250 only after the parent says the
commit is durable — or 451 if the parent says it failed, does not answer within
SMTPGATE_STORE_TIMEOUT, or is gone. The serve process keeps processing, relaying and HTTP.

Each child talks to its parent over a socket pair; every frame is one JSON line, an enqueue line
is followed by the message's bytes:
  parent → child: {"settings": {...}}  once, at start (secrets left out: intake needs none)
                  {"ok": id} | {"failed": id, "error": text}   the outcome of an enqueue
  child → parent: {"ready": pid}        once its listeners serve
                  {"enqueue": id, "envelope": [peer, helo, from, [rcpt…]], "message_id": …,
                   "size": n} + n bytes
                  {"cancel": id}         the session gave up waiting (it answered 451)
                  {"replies": {"250": n, …}, "sessions": n}   counters, coalesced
When the parent dies (even by SIGKILL) the child reads EOF, answers 451 to the sessions waiting
for a commit and stops; SIGTERM from the parent stops it too: stop accepting, let the commits in
flight finish (up to a grace period). A child that exits on its own is logged and started again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from smtpgate import front
from smtpgate.config import ConfigError, Settings
from smtpgate.model import Envelope
from smtpgate.store import Store, StoreError

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds for a child to start and serve
RESTART_DELAY = 1.0  # seconds before a child that exited on its own is started again
FLUSH_SECONDS = 0.05  # a child reports its counters at most this often
# Settings a child has no use for: kept from it (secrets stay in one process). The relay user
# goes with its password, or the child's "set together" check refuses the pair.
SECRETS = frozenset({"relay_username", "relay_password", "api_password"})
ONE_WRITE_BYTES = 64 * 1024  # a message up to this size goes to the parent with its frame


# --- parent side ---------------------------------------------------------------------------------


# The longest frame line the serve process reads from a child: an enqueue's envelope (every
# recipient, the HELO name, the sender) as JSON. At asyncio's default of 64 KiB, a long but
# valid envelope read as an "unreadable frame", and the child, all its sessions with it, was
# killed. (It is also the reader's flow control: it stops reading the child at twice this
# much buffered, so it stays small next to the listener's 64 MiB of data.)
FRAME_LINE_LIMIT = 1024 * 1024


def session_shares(limit: int, count: int) -> list[int]:
    """SMTPGATE_MAX_CONNECTIONS shared out over `count` children, adding up to it exactly."""
    base, extra = divmod(limit, count)
    return [base + (i < extra) for i in range(count)]


class IntakeProcesses:
    """Starts, watches, restarts and stops the intake children of one `serve`."""

    def __init__(
        self,
        settings: Settings,
        listen_fds: Sequence[int],
        store: Store,
        on_queued: Callable[[], None],
        on_reply: Callable[[str, int], None],
    ) -> None:
        self.settings = settings
        self._store = store
        self._fds = list(listen_fds)
        self._on_queued = on_queued  # as front.Handler's: a message committed (for /metrics)
        self._on_reply = on_reply  # a child's replies, by code and count (for /metrics)
        count = settings.intake_processes
        # A child is one listener: it starts no intake processes of its own (and so its share
        # of SMTPGATE_MAX_CONNECTIONS, which is for the whole gateway, is enough for it).
        child = settings.model_dump(mode="json", exclude=set(SECRETS)) | {"intake_processes": 0}
        self._configs = [
            json.dumps({"settings": child | {"max_connections": share}}).encode() + b"\n"
            for share in session_shares(settings.max_connections, count)
        ]
        self._children = [_Child(i) for i in range(count)]
        self._stopping = False
        store.on_committed = self._answer
        loop = asyncio.get_running_loop()
        self._loop_name = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"

    async def start(self) -> None:
        try:
            for child in self._children:
                await self._spawn(child)
            async with asyncio.timeout(READY_TIMEOUT):
                await asyncio.gather(*(child.ready.wait() for child in self._children))
        except TimeoutError:
            await self.stop(1.0)
            raise ConfigError(
                "SMTPGATE_INTAKE_PROCESSES: an intake process did not start within"
                f" {READY_TIMEOUT:.0f} s (see its log lines above)"
            ) from None
        except BaseException:
            await self.stop(1.0)
            raise

    def sessions(self) -> int:
        return sum(child.sessions for child in self._children)

    def running(self) -> bool:
        """Every child is up and serving (for /healthz)."""
        return all(child.ready.is_set() for child in self._children)

    def pids(self) -> list[int]:
        return [c.process.pid for c in self._children if c.process is not None]

    async def stop(self, grace: float) -> None:
        """SIGTERM every child, wait up to `grace` (+2 s) for it to drain, then SIGKILL."""
        self._stopping = True
        for child in self._children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        for child in self._children:
            if child.process is None:
                continue
            try:
                async with asyncio.timeout(grace + 2.0):  # the child's grace, its last second
                    await child.process.wait()
            except TimeoutError:
                log.error("intake process %d did not stop in time; killing it", child.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
        for child in self._children:
            if child.watcher is not None:
                child.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.watcher
            child.close_channel()

    async def _spawn(self, child: _Child) -> None:
        mine, theirs = socket.socketpair()
        try:
            child.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smtpgate.intake",
                "--loop",
                self._loop_name,
                str(theirs.fileno()),
                *map(str, self._fds),
                pass_fds=(theirs.fileno(), *self._fds),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=mine, limit=FRAME_LINE_LIMIT)
        writer.write(self._configs[child.index])
        child.channel = writer
        child.watcher = asyncio.create_task(
            self._watch(child, reader), name=f"intake-{child.index}"
        )

    async def _watch(self, child: _Child, reader: asyncio.StreamReader) -> None:
        process = child.process
        assert process is not None
        commits = child.commits
        while True:
            try:
                line = await reader.readline()
                frame = json.loads(line.decode()) if line else None  # str: no encoding sniffed
                if frame is not None and "enqueue" in frame:
                    raw = await reader.readexactly(int(frame["size"]))
                    peer, helo, mail_from, rcpt_tos = frame["envelope"]
                    envelope = Envelope(
                        str(peer), str(helo), str(mail_from), tuple(map(str, rcpt_tos))
                    )
            except (ConnectionError, asyncio.IncompleteReadError):
                frame = None
            except (ValueError, KeyError, TypeError):  # not JSON, a line over the stream
                # limit, a frame without its parts: not our child
                log.error("intake process %d sent an unreadable frame; stopping it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                frame = None
            if frame is None:
                break
            if "enqueue" in frame:
                qid = str(frame["enqueue"])
                commits[qid] = self._store.enqueue_nowait(
                    envelope, raw, frame.get("message_id"), qid
                )  # answered by _answer
            elif "cancel" in frame:
                future = commits.pop(str(frame["cancel"]), None)
                if future is not None:
                    future.cancel()  # not written, if it is not being written already
            elif "ready" in frame:
                child.ready.set()
                log.info("intake process %d serving", process.pid)
            else:
                child.sessions = int(frame.get("sessions", child.sessions))
                for code, n in dict(frame.get("replies", {})).items():
                    self._on_reply(str(code), int(n))
        child.ready.clear()
        child.sessions = 0
        code = await process.wait()
        child.close_channel()
        if self._stopping:
            return
        # Its sessions are gone without an answer: what is not yet being written is not written
        # (the senders retry; a copy already committed is a duplicate to the dedupe key).
        for future in child.commits.values():
            future.cancel()
        child.commits.clear()
        log.error(
            "intake process %d exited unexpectedly (code %s); starting another in %.0f s",
            process.pid,
            code,
            RESTART_DELAY,
        )
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self._spawn(child)
                return
            except OSError as exc:  # out of processes or descriptors: keep trying
                log.error("could not start an intake process: %s; retrying", exc)

    def _answer(self, ids: list[str], error: str | None) -> None:
        """The store's `on_committed`: answer the children whose sessions wait for these
        messages, in one write per child, in the pass of the event loop where the commit
        ended (a task per message took two more passes, each as long as the workers' steps)."""
        answers: dict[_Child, list[bytes]] = {}
        try:
            for qid in ids:
                for child in self._children:
                    future = child.commits.pop(qid, None)
                    if future is not None:
                        break
                else:
                    continue  # the session gave up (cancel), or its child is gone
                if error is None:
                    answer: dict[str, str] = {"ok": qid}
                    try:
                        self._on_queued()
                    except Exception:  # the metrics' fault: the sender still gets its 250
                        log.exception("counting a queued message failed")
                else:
                    future.exception()  # retrieved: nothing else awaits it
                    answer = {"failed": qid, "error": error}
                answers.setdefault(child, []).append(json.dumps(answer).encode() + b"\n")
        finally:  # whatever happened, the answers made so far go
            for child, lines in answers.items():
                child.send(b"".join(lines))


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: asyncio.StreamWriter | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.sessions = 0
        self.commits: dict[str, asyncio.Future[None]] = {}  # enqueues being committed, by id

    def send(self, frames: bytes) -> None:
        if self.channel is not None and not self.channel.is_closing():
            self.channel.write(frames)

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


# --- child side ----------------------------------------------------------------------------------


class _ParentQueue:
    """Stands in for the Store in a child: enqueue = hand the message to the parent's commit."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self.idle = asyncio.Event()
        self.idle.set()

    async def enqueue(
        self, envelope: Envelope, raw: bytes, message_id: str | None, queue_id: str
    ) -> None:
        if self._writer.is_closing():
            raise StoreError("the serve process is gone")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[queue_id] = future
        self.idle.clear()
        head = {
            "enqueue": queue_id,
            "envelope": [envelope.peer, envelope.helo, envelope.mail_from, envelope.rcpt_tos],
            "message_id": message_id,
            "size": len(raw),
        }
        line = json.dumps(head).encode() + b"\n"
        if len(raw) <= ONE_WRITE_BYTES:
            self._writer.write(line + raw)  # one send() instead of two
        else:
            self._writer.write(line)  # no copy of a big message
            self._writer.write(raw)
        try:
            try:
                await self._writer.drain()  # big messages: wait for the parent to read them
            except ConnectionError:
                raise StoreError("the serve process is gone") from None
            await future
        except asyncio.CancelledError:  # the session's store timeout: it answers 451
            if not self._writer.is_closing():
                self._writer.write(json.dumps({"cancel": queue_id}).encode() + b"\n")
            raise
        finally:
            self._waiting.pop(queue_id, None)
            if not self._waiting:
                self.idle.set()

    def answered(self, frame: dict[str, Any]) -> None:
        if "ok" in frame:
            future = self._waiting.get(str(frame["ok"]))
            if future is not None and not future.done():
                future.set_result(None)
        elif "failed" in frame:
            future = self._waiting.get(str(frame["failed"]))
            if future is not None and not future.done():
                future.set_exception(StoreError(str(frame.get("error", "commit failed"))))

    def parent_gone(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(StoreError("the serve process is gone"))


class _Reporter:
    """Counts the listener's replies and sessions for the parent's /metrics, coalesced."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.sessions = front.Sessions()  # the listener's, once it exists
        self._replies: dict[str, int] = {}
        self._scheduled = False
        self._last_sessions = -1

    def reply(self, code: str) -> None:
        self._replies[code] = self._replies.get(code, 0) + 1
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        sessions = len(self.sessions)
        if (self._replies or sessions != self._last_sessions) and not self._writer.is_closing():
            report = {"replies": self._replies, "sessions": sessions}
            self._writer.write(json.dumps(report).encode() + b"\n")
            self._replies, self._last_sessions = {}, sessions

    async def tick(self) -> None:
        """Report session count changes that came without a reply (a client hung up)."""
        while True:
            await asyncio.sleep(1.0)
            self.flush()


async def _read_answers(reader: asyncio.StreamReader, queue: _ParentQueue) -> None:
    with contextlib.suppress(ConnectionError):
        while line := await reader.readline():
            queue.answered(json.loads(line))
    queue.parent_gone()


async def serve_child(channel_fd: int, listen_fds: Sequence[int]) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel_fd))
    config = json.loads(await reader.readline())
    settings = Settings.model_validate(config["settings"])
    from smtpgate.cli import freeze_start_up_objects, setup_logging

    setup_logging(settings)
    queue = _ParentQueue(writer)
    reporter = _Reporter(writer)
    handler = front.Handler(settings, queue, lambda: None)
    factory, reporter.sessions = front.listener_factory(
        settings, handler, front.listener_tls_context(settings), reporter.reply
    )
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(factory, sock=socket.socket(fileno=fd)) for fd in listen_fds
    ]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the parent stops its children in order.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    # SIGHUP to the whole service (`systemctl kill -s HUP`, a closed terminal) reloads the
    # parent's rules; a listener has none, and ending would cut its sessions off.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    freeze_start_up_objects()
    writer.write(json.dumps({"ready": os.getpid()}).encode() + b"\n")
    answers = asyncio.create_task(_read_answers(reader, queue), name="answers")  # ends at EOF
    stopping = asyncio.create_task(stop.wait(), name="sigterm")
    ticker = asyncio.create_task(reporter.tick(), name="report-tick")
    await asyncio.wait([answers, stopping], return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.close()
    # Each session gets 421 4.3.2; a message in DATA or in its commit (answered by the parent,
    # which goes on committing meanwhile) first gets its own answer.
    await reporter.sessions.shut_down(front.shutdown_grace(settings))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await queue.idle.wait()  # sessions cut off may still wait for the parent
    reporter.flush()
    for task in (answers, stopping, ticker):
        task.cancel()
    await asyncio.gather(answers, stopping, ticker, return_exceptions=True)
    with contextlib.suppress(Exception):
        writer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smtpgate.intake")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("channel", type=int, help="socket pair to the parent (file descriptor)")
    parser.add_argument("listen", type=int, nargs="+", help="listening sockets (descriptors)")
    args = parser.parse_args(argv)
    runner: Callable[[Any], int] = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    try:
        return runner(serve_child(args.channel, args.listen))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
