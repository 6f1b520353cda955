"""Composition root: opens the store and runs the workers, outbox sender and HTTP endpoint in one
asyncio loop, and the SMTP listener there too or in intake processes (smtpgate.intake); drains on
stop. Settings and rules are built once and passed down."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from smtpgate import __version__, front
from smtpgate.config import ConfigError, Rules, Settings, load_rules, make_data_dir
from smtpgate.http import Metrics, StatusServer
from smtpgate.intake import IntakeProcesses
from smtpgate.mail import ParsedMessage, parse_message
from smtpgate.model import Outcome, host_port
from smtpgate.pipeline import FORWARD_BOUNCED, Context, decide, dedupe_key, fingerprint
from smtpgate.relay import DeliveryError, Mail, RelayClient, relay_tls_context
from smtpgate.store import Delivery, Job, Store, is_transient_error
from smtpgate.worker import WorkerPool, backoff, scheduled_delay

log = logging.getLogger("smtpgate")

LEASE_SECONDS = 300.0
# Mails a relay connection may have sent that the store has not yet recorded as done: a crash
# re-sends at most these. The next send waits for the record of the one before the last.
RELAYED_UNRECORDED = 2
# Mail data one relay connection claims at once (always at least one mail): 16 forwards of
# 25 MB each per connection took 50 x 25 MB of mail to 1.6 GB in the serve process.
RELAY_CLAIM_BYTES = 16 * 1024 * 1024
# Outbox mails per relay connection that decisions may claim as they queue them (Store.hand_over).
FRESH_MAILS = 16
# A sender whose connection to the relay failed (down, TLS, a wrong password) waits before it
# claims again: 5 s, doubled after each failure in a row, at most 5 minutes.
RELAY_BACKOFF = 5.0
RELAY_BACKOFF_MAX = 300.0
SWEEP_SECONDS = 30.0
RETENTION_SWEEP_SECONDS = 3600.0
# How much longer a stop waits for the relay's answer to mails it has whole (see stop): within
# the unit's TimeoutStopSec=45 and the compose file's stop_grace_period with the rest of a stop.
STOP_ANSWER_SECONDS = 8.0
# Parsing costs ~30 ms per MB and holds the loop: a 25 MB message held it 0.7 s, long enough
# for concurrent intake commits to miss SMTPGATE_STORE_TIMEOUT (451). Big ones go to a thread
# (docs/performance.md); small ones stay inline, where a thread hop would cost more than it saves.
PARSE_IN_THREAD_BYTES = 1 << 20
# Raw bytes of the messages claimed for processing at once, whatever SMTPGATE_WORKERS says: a
# queue of 25 MB messages is worked a few at a time, a queue of alerts SMTPGATE_WORKERS at a time.
PROCESSING_BYTES = 64 << 20
# Workers are woken by each intake commit; the poll only finds retries that became due.
WORKER_POLL_SECONDS = 1.0
# How long a reply waits for the message it answers when both are processed at once (a big
# first message still parsing); then it is decided without that message's ticket.
ANSWERED_WAIT_SECONDS = 60.0


def _dedupe_keys(msg: ParsedMessage, job: Job) -> tuple[str, str | None]:
    """The duplicate key and the content fingerprint under it (Store.complete)."""
    return dedupe_key(msg.message_id, job.raw), fingerprint(msg.message_id, msg)


@dataclass(slots=True)
class _InProcess:
    """A message being processed: the Message-IDs it is known by, set once it is decided."""

    ids: set[str]
    done: asyncio.Event | None = None  # made when a reply waits for it


class Gateway:
    """The running gateway. `await start()`, then `await stop()`; ports are known after start."""

    def __init__(self, settings: Settings, rules: Rules) -> None:
        self.settings = settings
        self.rules = rules
        self.metrics = Metrics()
        self.store: Store | None = None
        self.smtp_port = 0
        self._serving = False  # said "listening": "stopped" is said too
        self.http_port = 0
        self._servers: list[asyncio.Server] = []
        self.status_server: StatusServer | None = None  # the HTTP endpoint, once started
        self._pools: list[WorkerPool[Job]] = []
        self._senders: list[asyncio.Task[None]] = []
        self._relay_clients: list[RelayClient] = []
        self._background: list[asyncio.Task[None]] = []
        self._outbox_wake = asyncio.Event()
        # (outbox id, kind) of mail taken by the relay, not yet recorded done; each future is
        # set once it is recorded. Not the Delivery: it would keep the mail's data alive.
        self._relayed: list[tuple[int, str, asyncio.Future[None]]] = []
        self._relayed_wake = asyncio.Event()
        # Outbox ids a sender has begun to send and whose outcome is not recorded yet: the lease
        # sweeper leaves them alone, however long the store takes to record them.
        self._sending: set[int] = set()
        self._recorder: asyncio.Task[None] | None = None
        self._alone: asyncio.Task[None] | None = None  # messages a crash left (_process_alone)
        self._senders_stopped = False
        self._stopping = asyncio.Event()
        self.intake: IntakeProcesses | None = None
        self._smtp_sessions: front.Sessions | None = None  # the listener here (no intake process)
        # the in-process listener's (each intake process has its own)
        self.data_budget = front.DataBudget(front.DATA_BUDGET_BYTES)
        self._processing_bytes = 0  # raw bytes of the claimed messages not yet processed
        self._big_parse = asyncio.Semaphore(1)
        # Messages being processed, in the order they were taken, with the Message-IDs they
        # are known by: a reply waits for the message it answers (`_after_answered`).
        self._in_process: dict[int, _InProcess] = {}
        self._taken = itertools.count()
        self._lock_file: IO[str] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Everything up, or nothing: a failure part-way stops what had started (the store's
        threads would otherwise keep the process alive) and is raised; a port that cannot be
        bound or TLS files that do not load are a ConfigError naming the variable."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=1.0)
            raise

    async def _start(self) -> None:
        s = self.settings
        make_data_dir(s)
        self._lock_file = _single_server_lock(s)
        self.store = store = await Store.open(s.db_path)
        recovered = await store.recover(max_crashes=s.process_max_attempts)
        if recovered.inbound or recovered.outbox:
            log.info(
                "requeued %d message(s) and %d delivery(ies) after a restart",
                len(recovered.inbound),
                recovered.outbox,
            )
        for queue_id, message_id in recovered.dead:
            log.warning(
                "message %s (Message-ID %s) set aside as dead: the serve process stopped %d"
                " times while processing it alone",
                queue_id,
                message_id or "none",
                s.process_max_attempts,
                extra={"queue_id": queue_id},
            )
        tls_context = front.listener_tls_context(s)  # fails here, in the parent, if misconfigured
        loop = asyncio.get_running_loop()
        if s.intake_processes:
            # Bound here, served by the children: the port is known now and stays bound while
            # a child restarts (connections wait in the backlog).
            with _listening("SMTPGATE_SMTP_HOST / SMTPGATE_SMTP_PORT", s.smtp_host, s.smtp_port):
                smtp = await loop.create_server(
                    asyncio.Protocol, host=s.smtp_host, port=s.smtp_port, start_serving=False
                )
            self._servers.append(smtp)
            fds = [sock.fileno() for sock in smtp.sockets]
            self.intake = IntakeProcesses(
                s, fds, store, self.metrics.received.inc, self._count_reply
            )
            await self.intake.start()
            sessions = self.intake.sessions
        else:
            handler = front.Handler(s, store, self.metrics.received.inc)
            factory, listeners = front.listener_factory(
                s, handler, tls_context, self._count_reply, self.data_budget
            )
            self._smtp_sessions = listeners
            with _listening("SMTPGATE_SMTP_HOST / SMTPGATE_SMTP_PORT", s.smtp_host, s.smtp_port):
                smtp = await loop.create_server(factory, host=s.smtp_host, port=s.smtp_port)
            self._servers.append(smtp)
            sessions = listeners.__len__
        self.smtp_port = smtp.sockets[0].getsockname()[1]
        # Unhealthy once the disk cannot take one more message of the largest size accepted.
        status = StatusServer(
            store,
            self.metrics,
            sessions,
            self._intake_running,
            s.max_message_bytes,
            names=(s.hostname, socket.gethostname(), *s.http_names),
        )
        self.status_server = status
        with _listening("SMTPGATE_HTTP_HOST / SMTPGATE_HTTP_PORT", s.http_host, s.http_port):
            http = await asyncio.start_server(status.handle, host=s.http_host, port=s.http_port)
        self._servers.append(http)
        self.http_port = http.sockets[0].getsockname()[1]

        pool: WorkerPool[Job] = WorkerPool(
            "worker",
            claim=self._claim,
            run=self._run,
            on_error=self._process_failed,
            concurrency=s.workers,
            wake=store.new_work,
            poll=WORKER_POLL_SECONDS,
        )
        # New messages and mails claimed by the transactions that queue them.
        store.hand_over(s.workers, FRESH_MAILS * s.relay_connections, LEASE_SECONDS)
        self._pools.append(pool)
        if recovered.inbound:
            # The process before stopped with these in processing: one may have killed it.
            self._alone = asyncio.create_task(
                self._process_alone(recovered.inbound, pool), name="recovered-alone"
            )
        else:
            pool.start()
        tls = relay_tls_context(s)
        self._relay_clients = [RelayClient(s, tls) for _ in range(s.relay_connections)]
        self._senders = [
            asyncio.create_task(self._send_loop(client), name=f"relay-{i}")
            for i, client in enumerate(self._relay_clients)
        ]
        self._start_recorder()
        self._background = [
            asyncio.create_task(self._sweep(), name="lease-sweeper"),
            asyncio.create_task(self._retention(), name="retention"),
        ]
        log.info(
            "smtpgate %s listening on %s (SMTP) and %s (HTTP); connectors: %s",
            __version__,
            host_port(s.smtp_host, self.smtp_port),
            host_port(s.http_host, self.http_port),
            ", ".join(s.connector_addresses),
        )
        self._serving = True

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish or release in-flight work, close the store. `grace`: how long
        in-flight work may take; by default a message in DATA or in its commit gets
        SMTPGATE_STORE_TIMEOUT + 2 s (front.shutdown_grace), processing and relaying 5 s."""
        self._stopping.set()
        session_grace = front.shutdown_grace(self.settings) if grace is None else grace
        grace = 5.0 if grace is None else grace
        # SMTP sessions first, while the store still commits: each gets 421 4.3.2, a message
        # in DATA or in its commit its own answer (250 or 451) before that.
        if self.intake is not None:
            await self.intake.stop(session_grace)
        for server in self._servers:
            server.close()
        if self._smtp_sessions is not None:
            await self._smtp_sessions.shut_down(session_grace)
        if self._alone is not None:  # the message in hand may finish, as the workers' may
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(asyncio.shield(self._alone), return_exceptions=True)
            self._alone.cancel()
            await asyncio.gather(self._alone, return_exceptions=True)
        for pool in self._pools:
            await pool.stop(grace)
        self._outbox_wake.set()
        for task in self._background:
            task.cancel()
        if self._senders:  # (asyncio.wait: a timeout must not cancel them yet)
            await asyncio.wait(self._senders, timeout=grace)
        answering = [
            task
            for task, client in zip(self._senders, self._relay_clients, strict=True)
            if client.answer_due and not task.done()
        ]
        if answering:
            # The relay has these mails whole: cut off now, they would count as unsent and go
            # again at the next start (a content filter, a busy Exchange take seconds).
            log.info(
                "stopping: waiting up to %.0f s for the relay's answer to %d mail(s) it has",
                STOP_ANSWER_SECONDS,
                len(answering),
            )
            await asyncio.wait(answering, timeout=STOP_ANSWER_SECONDS)
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, *self._background, return_exceptions=True)
        self._senders_stopped = True  # the recorder records what they relayed, then ends
        self._relayed_wake.set()
        if self._recorder is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(self._recorder, return_exceptions=True)
            self._recorder.cancel()
            await asyncio.gather(self._recorder, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await server.wait_closed()
        if self.store is not None:
            await self.store.close()
        if self._lock_file is not None:
            self._lock_file.close()
        if self._serving:  # a start that failed is said once, by its error
            log.info("smtpgate stopped")

    def reload_rules(self) -> bool:
        """SIGHUP: swap in a valid rules file atomically; keep the old rules if it is invalid."""
        try:
            rules = load_rules(self.settings.rules_file)
        except ConfigError as exc:
            log.error("rules reload rejected, old rules stay in force: %s", exc)
            return False
        self.rules = rules
        log.info(
            "rules reloaded: %d detection, %d skip, %d account rule(s)",
            len(rules.detection),
            len(rules.skip),
            len(rules.account),
        )
        return True

    # --- processing ------------------------------------------------------------------------------

    async def _process_alone(self, queue_ids: list[str], pool: WorkerPool[Job]) -> None:
        """The messages the last process stopped with, one at a time, before the workers start:
        a crash now is the one message's (Store.recover counts it), not the others' beside it.
        New mail is accepted meanwhile, and waits for the workers."""
        assert self.store is not None
        try:
            for queue_id in queue_ids:
                if self._stopping.is_set():
                    return
                try:
                    job = await self.store.claim_alone(queue_id, LEASE_SECONDS)
                except Exception as exc:  # (a full disk): the workers will take it as any other
                    log.warning("could not claim %s to process it alone: %s", queue_id, exc)
                    continue
                if job is None:
                    continue  # done or retried since
                try:
                    await self.process(job)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await self.store.release_alone(job)
                    raise
                except Exception as exc:
                    await self._process_failed(job, exc)
        finally:
            if not self._stopping.is_set():
                pool.start()  # whatever happened above: the rest of the mail must go on

    async def _claim(self, n: int) -> list[Job]:
        assert self.store is not None
        budget = PROCESSING_BYTES - self._processing_bytes
        if budget <= 0:
            return []  # the pool asks again when a message is done
        jobs = await self.store.claim(n, LEASE_SECONDS, max_bytes=budget)
        self._processing_bytes += sum(len(job.raw) for job in jobs)
        return jobs

    async def _run(self, job: Job) -> None:
        try:
            await self.process(job)
        finally:
            self._processing_bytes -= len(job.raw)

    async def process(self, job: Job) -> None:
        assert self.store is not None
        turn = next(self._taken)
        this = self._in_process[turn] = _InProcess({job.message_id} if job.message_id else set())
        try:
            if len(job.raw) > PARSE_IN_THREAD_BYTES:
                # One at a time: the parser holds the GIL, so parallel parses gain nothing, and
                # each takes ~7 x the message in memory while it runs (25 MB: ~170 MB).
                async with self._big_parse:
                    msg = await asyncio.to_thread(parse_message, job.raw)
            else:
                msg = parse_message(job.raw)
            if msg.message_id:
                this.ids.add(msg.message_id)
            if msg.in_reply_to or msg.references:
                await self._after_answered(turn, {*msg.in_reply_to, *msg.references})
            ctx = Context(self.settings, self.rules)
            decision = await decide(job.raw, job.envelope.mail_from, msg, ctx, self.store)
            if len(job.raw) > PARSE_IN_THREAD_BYTES:  # hashing 25 MB would hold the loop
                key, seen = await asyncio.to_thread(_dedupe_keys, msg, job)
            else:
                key, seen = _dedupe_keys(msg, job)
            outcome = await self.store.complete(
                job,
                decision,
                dedupe_key=key,
                fingerprint=seen,
                auto_mail_hourly_limit=self.settings.auto_mail_hourly_limit,
            )
        finally:
            del self._in_process[turn]
            if this.done is not None:
                this.done.set()
        if outcome is None:
            log.warning("lost the lease of %s; another worker has it", job.id)
            return
        self._record(job, outcome)
        if outcome.sent:
            self._outbox_wake.set()

    async def _after_answered(self, turn: int, answered: set[str]) -> None:
        """Wait until the messages taken before this one that it answers are decided.

        A customer's follow-up to their own mail, processed beside it, would otherwise find no
        ticket for it yet and open a second one. Only earlier messages are waited for, so two
        messages naming each other cannot wait for each other; the wait is bounded, and a
        message that fails leaves its replies to be decided without it.
        """
        waits = []
        for earlier, other in self._in_process.items():
            if earlier >= turn:
                break  # taken after this one (the dict keeps the order of taking)
            if not other.ids.isdisjoint(answered):
                if other.done is None:
                    other.done = asyncio.Event()
                waits.append(other.done.wait())
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWERED_WAIT_SECONDS):
                    await asyncio.gather(*waits)

    def _record(self, job: Job, outcome: Outcome) -> None:
        self.metrics.processed.labels(outcome.path, outcome.action).inc()
        for rule in outcome.rules_hit:
            self.metrics.rule_hits.labels(rule).inc()
        self.metrics.latency.observe(max(0.0, time.time() - job.received_at))
        log.info(
            "processed %s path=%s action=%s reason=%s account=%s ticket=%s rules=%s sent=%s",
            job.id,
            outcome.path,
            outcome.action,
            outcome.reason,
            outcome.account,
            outcome.ticket,
            ",".join(outcome.rules_hit) or "-",
            ";".join(f"{m['kind']}:{','.join(m['to'])}" for m in outcome.sent) or "-",
            extra={"queue_id": job.id, "outcome": outcome.to_json()},
        )
        if outcome.reason == FORWARD_BOUNCED:
            self.metrics.forward_bounces.inc()
            log.warning(
                "a forward of ours bounced (delivery report %s): the mailbox it went to (the"
                " internal support address %s, or the skip address) may be losing forwards",
                job.id,
                self.settings.internal_support_address,
                extra={"queue_id": job.id},
            )

    async def _process_failed(self, job: Job, exc: BaseException) -> None:
        assert self.store is not None
        self.metrics.processing_failures.inc()
        error = f"{type(exc).__name__}: {exc}"
        transient = is_transient_error(exc)
        try:
            dead = await self.store.fail(
                job,
                error,
                max_attempts=self.settings.process_max_attempts,
                backoff=backoff(2 if transient else job.attempts),
                transient=transient,
            )
        except Exception as failure:  # the store cannot take this write either (a full disk)
            outcome = f", not recorded ({failure}): queued again when its lease ends"
        else:
            outcome = ", now dead" if dead else ", will retry"
        log.error(
            "processing %s failed (attempt %d)%s: %s",
            job.id,
            job.attempts,
            outcome,
            error,
            exc_info=exc,
            extra={"queue_id": job.id},
        )

    # --- outbox ----------------------------------------------------------------------------------

    async def _send_loop(self, client: RelayClient) -> None:
        assert self.store is not None
        store = self.store
        unrecorded: collections.deque[asyncio.Future[None]] = collections.deque()
        backoff = 0.0  # after a failed connection to the relay (RELAY_BACKOFF)
        try:
            while not self._stopping.is_set():
                self._outbox_wake.clear()  # before claiming, so no wake-up is lost
                try:
                    batch = await store.claim_deliveries(
                        16, LEASE_SECONDS, max_bytes=RELAY_CLAIM_BYTES
                    )
                except Exception as exc:
                    log.warning("outbox claim failed: %s", exc)
                    batch = []
                if not batch:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._outbox_wake.wait()
                    continue
                if await self._deliver(client, batch, unrecorded):
                    backoff = min(backoff * 2, RELAY_BACKOFF_MAX) if backoff else RELAY_BACKOFF
                    log.warning("relay connection failed: next try in %.0f s", backoff)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff):
                            await self._stopping.wait()
                else:
                    backoff = 0.0
        finally:
            await client.close()

    async def _deliver(
        self,
        client: RelayClient,
        batch: Sequence[Delivery],
        unrecorded: collections.deque[asyncio.Future[None]],
    ) -> bool:
        """Send a claim's mails in turn; True if the connection to the relay failed. Cancelled
        (a stop whose grace ended while the relay was slow), the mails not tried yet go back
        to the queue untried, as they do when the stop comes between two mails."""
        assert self.store is not None
        untried = 0  # the claim's first mail not tried yet
        handed: list[Delivery] = []  # mails claimed for the senders, taken back at a failure
        try:
            for n, item in enumerate(batch):
                if self._stopping.is_set():
                    # Given back untried, as a lapsed claim's are: left active, they counted an
                    # attempt (a later step of the retry schedule at their first real failure).
                    await self._unclaim(batch[n:], "stopping")
                    return False
                while len(unrecorded) >= RELAYED_UNRECORDED:
                    await unrecorded.popleft()  # usually recorded already, during the last send
                if time.time() >= item.lease_until:
                    # The claim lapsed while the mails before were sent (a slow relay): the sweeper
                    # may have given these to another sender already. Not sent here.
                    await self._unclaim(batch[n:], "their claim lapsed before their turn")
                    return False
                self._sending.add(item.id)  # from here on the sweeper leaves it alone
                untried = n + 1
                try:
                    # The next mail's commands go with this one's data (one write a mail).
                    then = batch[n + 1] if n + 1 < len(batch) else None
                    reply = await client.send(
                        item.mail_from,
                        item.recipients,
                        item.data,
                        then=Mail(then.mail_from, then.recipients, then.data) if then else None,
                    )
                except DeliveryError as exc:
                    await self._delivery_failed(item, exc)
                    if not exc.connection:
                        continue
                    # Trying the claim's other mails would only fail the same way, and with a
                    # wrong password each try is a failed login (Microsoft 365 locks the account,
                    # fail2ban bans the gateway): they go back to the queue unsent, and so do the
                    # mails claimed for the senders as they were queued (Store.hand_over).
                    handed = self.store.pause_mail_hand_over()
                    rest = [*batch[n + 1 :], *handed]
                    if rest:
                        await self._unclaim(rest, "the relay connection failed")
                    await self._expire_undelivered(exc)
                    return True
                except Exception as exc:  # a bug: fail this delivery, keep the sender alive
                    log.exception("relay send of outbox %d crashed", item.id)
                    await client.close()
                    await self._delivery_failed(
                        item, DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False)
                    )
                    continue
                recorded = asyncio.get_running_loop().create_future()
                self._relayed.append((item.id, item.kind, recorded))
                unrecorded.append(recorded)
                self._relayed_wake.set()
                log.info(
                    "delivered outbox %d (%s) of %s to %s: %s",
                    item.id,
                    item.kind,
                    item.inbound_id or "-",
                    ",".join(item.recipients),
                    reply,
                    extra={"outbox_id": item.id, "queue_id": item.inbound_id},
                )
            return False
        except asyncio.CancelledError:
            # (Given back twice is given back once: a mail requeued meanwhile is left alone.)
            rest = [*batch[untried:], *handed]
            if rest:
                await self._unclaim(rest, "stopping")
            raise

    async def _expire_undelivered(self, exc: DeliveryError) -> None:
        """While the relay cannot be reached, mails are not tried, so none fails for its age:
        after a failed connection, every queued mail older than SMTPGATE_RETRY_MAX_AGE goes
        dead at once, as a failed try would have made it."""
        assert self.store is not None
        max_age = self.settings.retry_max_age
        try:
            n = await self.store.expire_deliveries(
                time.time() - max_age,
                f"undelivered after {max_age:.0f} s (SMTPGATE_RETRY_MAX_AGE): {exc}",
            )
        except Exception as store_exc:  # tried again after the next failed connection
            log.warning("could not expire undelivered mail: %s", store_exc)
            return
        if n:
            self.metrics.delivery_failures.labels("permanent").inc(n)
            log.warning(
                "%d mail(s) dead: undelivered after %.0f s, the relay unreachable", n, max_age
            )

    async def _unclaim(self, rest: Sequence[Delivery], why: str) -> None:
        """Queue again claimed mails not sent, unless another sender has claimed them since
        (their claim lapsed)."""
        assert self.store is not None
        try:
            n = await self.store.unclaim_deliveries(rest)
        except Exception as exc:  # the lease sweeper queues them again later
            log.warning("could not requeue %d unsent mail(s) (%s): %s", len(rest), why, exc)
            return
        log.info("%d mail(s) queued again unsent: %s", n, why)
        if n:
            self._outbox_wake.set()

    def _start_recorder(self) -> None:
        self._recorder = asyncio.create_task(self._record_relayed(), name="relay-recorder")
        self._recorder.add_done_callback(self._recorder_ended)

    def _recorder_ended(self, task: asyncio.Task[None]) -> None:
        """The recorder only ends at stop; should a bug end it sooner, log it and start anew
        (the senders wait for it: without it the outbox would stall)."""
        if task.cancelled() or self._senders_stopped:
            return
        log.error("the relay recorder ended unexpectedly; restarting it", exc_info=task.exception())
        self._start_recorder()

    async def _record_relayed(self) -> None:
        """Record relayed mail as done: each transaction takes every mail relayed since the
        last one began (group commit), and none waits for a batch to finish.

        A sender goes on while its last mail is being recorded, but not further
        (RELAYED_UNRECORDED), so a crash re-sends at most two mails per relay connection.
        (Marking each sender's batch of 16 at its end re-sent up to 16 per connection;
        committing each mail on its own before the next send halved the relay rate.) While the
        store cannot write, the marks are kept and retried, and the senders wait.
        """
        assert self.store is not None
        store = self.store
        pause = 0.5
        while True:
            if not self._relayed:
                if self._senders_stopped:
                    return
                self._relayed_wake.clear()
                await self._relayed_wake.wait()
                continue
            batch, self._relayed = self._relayed, []
            try:
                await store.delivery_done([outbox_id for outbox_id, _, _ in batch])
            except Exception as exc:
                self._relayed[:0] = batch
                if self._senders_stopped:  # after a restart their leases expire: sent again
                    log.error("%d relayed mail(s) could not be recorded: %s", len(batch), exc)
                    return
                log.warning(
                    "%d relayed mail(s) not recorded yet (retrying in %.1fs): %s",
                    len(batch),
                    pause,
                    exc,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
                continue
            pause = 0.5
            for outbox_id, _, recorded in batch:  # first: nothing below may leave a sender waiting
                self._sending.discard(outbox_id)
                if not recorded.done():
                    recorded.set_result(None)
            # Counted once committed, so the metric never runs ahead of the outbox state.
            for _, kind, _ in batch:
                self.metrics.deliveries.labels(kind).inc()

    async def _delivery_failed(self, item: Delivery, exc: DeliveryError) -> None:
        assert self.store is not None
        s = self.settings
        age = time.time() - item.created_at
        retry_at = None
        error = str(exc)
        if not exc.permanent:
            if age < s.retry_max_age:
                retry_at = time.time() + scheduled_delay(s.retry_schedule, item.attempts)
                # Tried once more when its time is up, not hours after (a long schedule step).
                retry_at = min(retry_at, item.created_at + s.retry_max_age)
            else:  # dead for its age: the relay's last answer alone would not say so
                error = f"undelivered after {age:.0f} s (SMTPGATE_RETRY_MAX_AGE): {error}"
        try:
            await self.store.delivery_failed(item.id, error, retry_at)
        except Exception as store_exc:  # it stays claimed: tried again when its lease expires
            log.warning("could not record the failed delivery of outbox %d: %s", item.id, store_exc)
            return
        finally:
            self._sending.discard(item.id)  # not delivered: sending it again is right
        self.metrics.delivery_failures.labels("permanent" if exc.permanent else "transient").inc()
        log.warning(
            "delivery of outbox %d of %s to %s failed (attempt %d): %s; %s",
            item.id,
            item.inbound_id or "-",
            ",".join(item.recipients),
            item.attempts,
            error,
            "dead" if retry_at is None else f"retry in {retry_at - time.time():.0f}s",
            extra={"outbox_id": item.id, "queue_id": item.inbound_id},
        )

    # --- housekeeping ----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                if await self.store.release_expired(keep_outbox=self._sending):
                    self.store.new_work.set()
                    self._outbox_wake.set()
            except Exception as exc:
                log.warning("lease sweep failed: %s", exc)

    async def _retention(self) -> None:
        assert self.store is not None
        while True:
            try:
                purged = await self.store.purge(self.settings.retention_days)
                if purged:
                    log.info("retention: removed raw bytes of %d done message(s)", purged)
            except Exception as exc:
                log.warning("retention sweep failed: %s", exc)
            await asyncio.sleep(RETENTION_SWEEP_SECONDS)

    def _count_reply(self, code: str, n: int = 1) -> None:
        if code == front.GREETING:
            self.metrics.connections.inc(n)
            code = "220"
        self.metrics.smtp_replies.labels(code).inc(n)

    def _intake_running(self) -> bool:
        return self.intake is None or self.intake.running()


@contextlib.contextmanager
def _listening(variables: str, host: str, port: int) -> Iterator[None]:
    """A listening socket that cannot be opened is a configuration error naming its variables
    (address in use, no such host, no permission for a low port)."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"{variables}: cannot listen on {host}:{port}: {exc}") from None


def _single_server_lock(settings: Settings) -> IO[str]:
    """One `serve` per data directory: leases are reset at start-up, which is only safe alone."""
    path = settings.data_dir / "smtpgate.lock"
    try:
        handle = path.open("a+")
    except OSError as exc:
        raise ConfigError(f"SMTPGATE_DATA_DIR: cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"SMTPGATE_DATA_DIR: another smtpgate serve is already running on {settings.data_dir}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
