"""The `smtpgate` command: serve, status, explain, queue, outbox, tickets, accounts, contacts,
employees, rules, backup. Every --json output is a stable interface with snake_case keys."""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpgate import __version__
from smtpgate.status import fast_status, render_status

# pydantic(-settings), asyncio and aiosqlite are imported by the verbs that use them, not here:
# `smtpgate status` is polled by monitoring and answers without them (see smtpgate/status.py).
if TYPE_CHECKING:
    from smtpgate.config import Rules, Settings
    from smtpgate.store import SchemaMode, Store

log = logging.getLogger("smtpgate")

_IMPORT_COLUMNS: dict[str, frozenset[str]] = {
    "contacts": frozenset({"rec_id", "account_rec_id", "account_file_as", "name", "email"}),
    "employees": frozenset({"rec_id", "name", "email1", "email2", "active"}),
}


def import_columns(kind: str) -> frozenset[str]:
    """The columns an import file of `kind` (accounts, contacts, employees) may have."""
    if kind == "accounts":
        from smtpgate.store.crm import ACCOUNT_COLUMNS

        return frozenset(ACCOUNT_COLUMNS) - {"created_by", "updated_by"}
    return _IMPORT_COLUMNS[kind]


def _shown(line: str) -> str:
    """`line` with every character that is not printable escaped (controls, separators, the
    format characters that reorder or hide text); no table kept (a sender could grow one)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def _shown_text(text: str) -> str:
    """Stored text (a ticket's details, a note) as the text output prints it: as `_shown`,
    its lines and tabs kept."""
    return "\n".join("\t".join(map(_shown, line.split("\t"))) for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """The text lines' time in UTC, as logging writes it ("2026-11-27 12:00:00,123"), its
    strftime done once a second instead of on every line (several lines a message)."""

    _second = -1
    _text = ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, its control characters escaped: what a client sends (a CR in a quoted
        local part, an ESC in a VRFY argument) must not forge a log line or drive a terminal.
        (JSON lines escape them as JSON does.)"""
        line = super().formatMessage(record)
        return line if line.isprintable() else _shown(line)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return f"{self._text},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """SMTPGATE_LOG_FORMAT=json: one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            # "Z": UTC whatever the host's time zone.
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("queue_id", "outbox_id", "outcome"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def freeze_start_up_objects() -> None:
    """Keep what start-up made (modules, settings, compiled rules: ~200,000 objects) out of the
    cyclic garbage collector's full collections, which otherwise walk all of it every time:
    a pause of 20–35 ms in the middle of a mail storm, each time the serve process got one."""
    gc.collect()
    gc.freeze()


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # What neither format prints is not worked out for every record (the logging HOWTO's
    # "Optimization"): the caller's file and line (a walk up the stack), thread and process.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # aiosmtpd logs every session at INFO; that is noise next to our per-message lines.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
    # aiosqlite's DEBUG lines repeat every statement's parameters: raw messages and passwords.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


def _print_json(value: Any) -> None:
    """JSON for a terminal: non-ASCII kept readable, but what `_shown` escapes in the text
    views (C1 controls such as CSI, bidi overrides, other invisible characters a sender
    chose) as JSON's own \\u escapes; the parsed values are the same."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    if not text.replace("\n", "").isprintable():  # (the only newlines are the layout's)
        text = "".join(c if c.isprintable() or c == "\n" else _json_escaped(c) for c in text)
    print(text)


def _json_escaped(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # (a surrogate pair, as JSON spells a character beyond the BMP)
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _one_more(args: argparse.Namespace) -> int:
    """The rows a list verb reads: one more than `--limit`, to tell a list cut at it."""
    return min(int(args.limit) + 1, 2**63 - 1)


def _print_rows(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    noun: str,
    line: Callable[[dict[str, Any]], str],
) -> int:
    """What a `list` verb prints: the rows as one JSON array, or one `line(row)` a row. The
    rows were read with one more than `args.limit`: a list cut at its limit says so on stderr
    (`accounts list --json > export.json` stopped at 1,000 accounts without a word). A line's
    characters that are not printable are escaped: senders chose many of the values, and an
    ESC or BEL in one would drive the operator's terminal."""
    shown = rows[: args.limit]
    if args.json:
        _print_json(shown)
    else:
        for row in shown:
            print(_shown(line(row)))
    if len(rows) > args.limit:
        sys.stdout.flush()
        print(
            f"smtpgate: the first {args.limit} {noun} shown; --limit N shows more",
            file=sys.stderr,
        )
    return 0


async def _requeue(
    args: argparse.Namespace, verb: str, noun: str, retry: Callable[[str | None], Awaitable[int]]
) -> int:
    """`VERB retry ID` or `VERB retry --dead`: dead rows back to queued; 1 when ID was not."""
    if args.id is None and not args.dead:
        print(f"{verb} retry: give an ID or --dead", file=sys.stderr)
        return 2
    n = await retry(None if args.dead else args.id)
    print(f"requeued {n} {noun}")
    if args.dead:
        # Nothing dead is no failure (a job's failure alert must not fire on a healthy queue).
        return 0
    if not n:
        print(
            f"smtpgate {verb} retry: {args.id} is not dead, or there is no such id", file=sys.stderr
        )
        return 1
    return 0


def _say_no_store(settings: Settings) -> None:
    """The error when SMTPGATE_DATA_DIR holds no store: not an empty, healthy queue but a
    mistyped or missing SMTPGATE_DATA_DIR, or serve never ran there. A command that only reads
    or changes what is queued must not make an empty store there (a backup of it reported
    success)."""
    print(
        f"smtpgate: SMTPGATE_DATA_DIR: no store at {settings.db_path}"
        " (serve has not run with this data directory)",
        file=sys.stderr,
    )


def _store_exists(settings: Settings) -> bool:
    """Whether SMTPGATE_DATA_DIR holds a store. An empty file is none: a `touch` or a copy
    that failed (serve writes the schema into a new store before anything else)."""
    try:
        return settings.db_path.stat().st_size > 0
    except (FileNotFoundError, NotADirectoryError):
        return False


async def _with_store(
    settings: Settings,
    fn: Callable[[Store], Awaitable[int]],
    *,
    create: bool = False,
    any_schema: bool = False,
    reads: bool = False,
) -> int:
    """fn(the store); 1 without calling it when there is no store, unless `create` (the
    imports, which may run before serve ever did, make one). Only `serve` migrates an existing
    store: these commands refuse one that needs it (exit 2), except with `any_schema`. A
    command that only `reads` also works where the data directory cannot be written (a disk
    remounted read-only after errors): to look at the queue and back the store up from it."""
    from smtpgate.config import make_data_dir
    from smtpgate.store import Store

    exists = _store_exists(settings)
    if not exists and not create:
        _say_no_store(settings)
        return 1
    if reads and not os.access(settings.data_dir, os.W_OK):
        store = await Store.open_read_only(settings.db_path, any_schema=any_schema)
        try:
            return await fn(store)
        finally:
            await store.close()
    make_data_dir(settings)
    schema: SchemaMode = "any" if any_schema else "current" if exists else "upgrade"
    store = await Store.open(settings.db_path, schema=schema)
    try:
        return await fn(store)
    finally:
        await store.close()


# --- verbs ---------------------------------------------------------------------------------------


async def cmd_serve(settings: Settings, rules: Rules, _: argparse.Namespace) -> int:
    import asyncio
    import signal

    from smtpgate.app import Gateway
    from smtpgate.model import host_port

    # SIGHUP (`systemctl reload`) kills by default: one while the gateway starts (a migration
    # may take a while) is kept, and the rules are read again once it is up.
    reload_asked: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _: reload_asked.append(signum))
    gateway = Gateway(settings, rules)
    await gateway.start()
    freeze_start_up_objects()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_rules)
    if reload_asked:
        gateway.reload_rules()
    ready = (
        f"smtpgate: SMTP on {host_port(settings.smtp_host, gateway.smtp_port)}, "
        f"HTTP on http://{host_port(settings.http_host, gateway.http_port)}/"
    )
    if settings.log_format == "json":
        log.info("%s", ready)  # SMTPGATE_LOG_FORMAT=json: every stderr line is JSON
    else:
        print(f"{ready} (Ctrl-C stops)", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("signal received: draining")
    await gateway.stop()
    return 0


async def cmd_status(settings: Settings, _: Rules | None, args: argparse.Namespace) -> int:
    # main() answers from smtpgate.status.fast_status when it can; this is the full path.
    async def run(store: Store) -> int:
        print(render_status(await store.status(), args.json))
        return 0

    return await _with_store(settings, run, reads=True)


async def cmd_explain(settings: Settings, rules: Rules, args: argparse.Namespace) -> int:
    import asyncio

    from smtpgate.mail import parse_message
    from smtpgate.pipeline import Context, decide, dedupe_key, fingerprint

    try:
        raw = await asyncio.to_thread(Path(args.file).read_bytes)
    except OSError as exc:
        print(f"smtpgate explain: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    msg = parse_message(raw)
    mail_from, guessed = args.mail_from, None
    if mail_from is None:
        mail_from, guessed = _envelope_sender(raw, msg.from_address)

    async def run(store: Store) -> int:
        decision = await decide(raw, mail_from, msg, Context(settings, rules), store)
        outcome = await store.simulate(
            decision,
            msg.message_id,
            fingerprint(msg.message_id, msg),
            content_key=None if msg.message_id else dedupe_key(None, raw),
            hourly_limit=settings.auto_mail_hourly_limit,
        )
        result = outcome.to_json()
        result["rules_missed"] = decision.rules_missed
        if args.json:
            _print_json(result)
            return 0
        reason = f" ({result['reason']})" if result["reason"] else ""
        lines = [
            f"path:    {result['path']}",
            f"action:  {result['action']}{reason}",
            f"rules hit:    {', '.join(result['rules_hit']) or '-'}",
            f"rules missed: {', '.join(result['rules_missed']) or '-'}",
            f"account: {result['account'] or '-'}   ticket: {result['ticket'] or '-'}",
        ]
        if result["error_code"]:
            lines.append(f"error code: {result['error_code']}")
        lines += [f"would send {m['kind']} to {', '.join(m['to'])}" for m in result["sent"]]
        lines += [f"note: {note}" for note in [*result["notes"], guessed] if note]
        for line in lines:  # the message's values, escaped as the lists' are
            print(_shown(line))
        return 0

    if _store_exists(settings):
        return await _with_store(settings, run)
    # Rules can be tried out before serve ever ran: against an empty directory then, in a
    # store of its own that is thrown away (a mistyped SMTPGATE_DATA_DIR gets no store).
    import tempfile

    from smtpgate.store import Store

    print(
        f"smtpgate explain: no store at {settings.db_path} (SMTPGATE_DATA_DIR): explained"
        " against an empty directory, without accounts, contacts or tickets",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="smtpgate-explain-") as scratch:
        store = await Store.open(Path(scratch) / "smtpgate.db")
        try:
            return await run(store)
        finally:
            await store.close()


_RETURN_PATH = re.compile(rb"^Return-Path:[ \t]*<([^<>\r\n]*)>", re.IGNORECASE | re.MULTILINE)


def _envelope_sender(raw: bytes, from_address: str) -> tuple[str, str | None]:
    """The envelope sender of a saved message: its Return-Path (the delivering server wrote
    it), else its From: address. With neither, the null sender, and a note saying so: the
    pipeline takes a message from <> for a bounce."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    found = _RETURN_PATH.search(head)
    if found is not None:
        return found.group(1).decode("utf-8", "replace").strip(), None
    if from_address:
        return from_address, None
    return "", "no Return-Path or From: explained as from the null sender <> (see --mail-from)"


def _outcome_line(o: dict[str, Any] | None) -> str:
    if not o:
        return ""
    text = f"{o['path']}/{o['action']}"
    if o.get("reason"):
        text += f" ({o['reason']})"
    if o.get("ticket") is not None:
        text += f" ticket {o['ticket']}"
    return text


async def cmd_queue(settings: Settings, _: Rules | None, args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        if args.action == "list":
            return _print_rows(
                await store.list_inbound(args.state, _one_more(args)),
                args,
                "messages",
                lambda r: (
                    f"{r['id']}  {r['received_at']}  {r['state']:<6}  <{r['mail_from']}>  "
                    f"{_outcome_line(r['outcome']) or (r['last_error'] or '')}"
                ),
            )
        if args.action == "show":
            row = await store.get_inbound(args.id)
            if row is None:
                print(f"no message {args.id}", file=sys.stderr)
                return 1
            if args.raw:
                raw = await store.raw_message(args.id)
                if raw is None:  # an empty output read as an empty message
                    print(
                        f"smtpgate queue show: the raw bytes of {args.id} were removed after"
                        " SMTPGATE_RETENTION_DAYS; its outcome is kept (without --raw)",
                        file=sys.stderr,
                    )
                    return 1
                sys.stdout.buffer.write(raw)
                return 0
            _print_json(row)
            return 0
        return await _requeue(args, "queue", "message(s)", store.retry_inbound)

    return await _with_store(settings, run, reads=args.action != "retry")


async def cmd_outbox(settings: Settings, _: Rules | None, args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        if args.action == "list":
            return _print_rows(
                await store.list_outbox(args.state, _one_more(args)),
                args,
                "deliveries",
                lambda r: (
                    f"{r['id']:>6}  {r['kind']:<8} {r['state']:<6} attempts={r['attempts']}  "
                    f"to={','.join(r['recipients'])}  {r['last_error'] or ''}"
                ),
            )
        return await _requeue(
            args,
            "outbox",
            "delivery(ies)",
            lambda delivery: store.retry_outbox(None if delivery is None else int(delivery)),
        )

    return await _with_store(settings, run, reads=args.action != "retry")


async def cmd_tickets(settings: Settings, _: Rules | None, args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        if args.action == "list":
            return _print_rows(
                await store.list_tickets(_one_more(args)),
                args,
                "tickets",
                lambda t: (
                    f"#{t['number']:<6} {t['created_at']}  {t['account_name'] or t['account']}"
                    f"  {t['description']}"
                ),
            )
        ticket = await store.get_ticket(args.number)
        if ticket is None:
            print(f"no ticket {args.number}", file=sys.stderr)
            return 1
        if args.json:
            _print_json(ticket)
            return 0
        print(f"Ticket #{ticket['number']} ({ticket['rec_id']}) status {ticket['status']}")
        account = ticket["account_name"] or ticket["account"]
        print(_shown(f"account: {account}  source: {ticket['source']}"))
        print(_shown(f"description: {ticket['description']}"))
        print(f"\n{_shown_text(ticket['details'])}\n")
        for note in ticket["history"]:
            print(_shown(f"--- note {note['rec_id']} at {note['note_at']}"))
            print(f"{_shown_text(note['description'])}\n")
        return 0

    return await _with_store(settings, run, reads=True)


def read_rows(path: Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """CSV with a header row, or a JSON list of objects; ValueError names the line or item."""
    allowed = import_columns(kind)
    data_bytes = path.read_bytes()
    try:
        text = data_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data_bytes[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"line {line}: not UTF-8 (save the file as UTF-8; an Excel export may be"
            " Windows-1252): nothing imported"
        ) from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {exc.lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(data, list):
            raise ValueError("line 1: a JSON list of objects is required")
        lines = _json_item_lines(text)
        for i, item in enumerate(data):
            line = lines[i] if i < len(lines) else i + 1
            if not isinstance(item, dict):
                raise ValueError(f"line {line} (item {i + 1}): not an object")
            unknown = sorted(set(item) - allowed)
            if unknown:
                raise ValueError(
                    f"line {line} (item {i + 1}): unknown field(s) {', '.join(unknown)}"
                )
            nested = sorted(k for k, v in item.items() if isinstance(v, dict | list))
            if nested:
                raise ValueError(
                    f"line {line} (item {i + 1}): {', '.join(nested)} must be one value"
                    " (text, a number, true/false or null), not a list or an object"
                )
            rows.append((line, {k: (None if v is None else str(v)) for k, v in item.items()}))
        return rows
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if not header:
        raise ValueError("line 1: a header row is required")
    unknown = sorted(set(header) - allowed)
    if unknown:
        raise ValueError(f"line 1: unknown column(s) {', '.join(unknown)}")
    reader.fieldnames = header
    for row in reader:
        if None in row:
            raise ValueError(f"line {reader.line_num}: more values than columns")
        rows.append((reader.line_num, {k: v for k, v in row.items() if k}))
    return rows


def _json_item_lines(text: str) -> list[int]:
    """The line on which each item of a (valid) top-level JSON list starts."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    pos = text.index("[") + 1
    line, counted = 1, 0  # newlines are counted incrementally: linear for 100,000-item files
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)


async def cmd_import(settings: Settings, _: Rules | None, args: argparse.Namespace) -> int:
    kind = args.kind
    try:
        rows = read_rows(Path(args.file), kind)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        print(f"smtpgate: {args.file}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"smtpgate: {args.file}: {exc}; nothing imported", file=sys.stderr)
        return 1

    async def run(store: Store) -> int:
        importer = {
            "accounts": store.import_accounts,
            "contacts": store.import_contacts,
            "employees": store.import_employees,
        }[kind]
        try:
            imported = await importer(rows)
        except ValueError as exc:
            print(f"smtpgate: {args.file}: {exc}; nothing imported", file=sys.stderr)
            return 1
        for warning in imported.warnings:
            print(f"smtpgate: {args.file}: warning: {_shown(warning)}", file=sys.stderr)
        print(f"imported {imported.rows} {kind}")
        return 0

    return await _with_store(settings, run, create=True)  # the directory may come first


async def cmd_accounts_list(settings: Settings, _: Rules | None, args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        return _print_rows(
            await store.list_accounts(_one_more(args)),
            args,
            "accounts",
            lambda a: f"{a['rec_id']}  {a['file_as']}  {a['email1'] or ''} {a['email2'] or ''}",
        )

    return await _with_store(settings, run, reads=True)


async def cmd_rules(settings: Settings, rules: Rules, args: argparse.Namespace) -> int:
    from smtpgate.pipeline import STAGES

    stages = [
        {"stage": s.name, "description": s.description, "enabled": s.enabled(settings)}
        for s in STAGES
    ]
    data = {"stages": stages, **rules.model_dump(mode="json")}
    if args.json:
        _print_json(data)
        return 0
    print("Precedence (first stage that decides wins):")
    for i, s in enumerate(stages, 1):
        print(f"  {i}. {s['stage']:<15} {'on ' if s['enabled'] else 'off'}  {s['description']}")
    print(
        "  The decision is not applied to a message processed before (its Message-ID, or the"
        " same content within 24 h): that one is a duplicate (spec 2.4)."
    )
    print(f"account_by_sender = {str(rules.account_by_sender).lower()}")
    print(f"ticket_tag = {json.dumps(rules.ticket_tag, ensure_ascii=False)}")
    for i, pattern in enumerate(rules.quote_patterns):
        print(f"quote_patterns[{i}] = {json.dumps(pattern, ensure_ascii=False)}")
    for kind in ("detection", "skip", "account"):
        for rule in getattr(rules, kind):
            fields = {k: v for k, v in rule.model_dump().items() if v and k != "name"}
            print(f"  {rule.name}: {fields}")
    return 0


def _backup_target_problem(target: Path, store: Path) -> str | None:
    if target.is_dir():
        return f"{target} is a directory: give the path of the file to write"
    live = {store.resolve(), *(store.with_name(store.name + x).resolve() for x in ("-wal", "-shm"))}
    if target.resolve() in live:
        return f"{target} is the live store itself: give another path"
    return None


async def cmd_backup(settings: Settings, _: Rules | None, args: argparse.Namespace) -> int:
    problem = _backup_target_problem(Path(args.path), settings.db_path)
    if problem is not None:
        print(f"smtpgate backup: {problem}", file=sys.stderr)
        return 1

    async def run(store: Store) -> int:
        try:
            await store.backup(Path(args.path))
        except OSError as exc:  # a folder it cannot make or write to (a service user's rights)
            print(
                f"smtpgate backup: cannot write {args.path}: {exc.strerror or exc}", file=sys.stderr
            )
            return 1
        print(f"backup written to {args.path}")
        return 0

    # A copy whatever its schema: a backup timer keeps working between an upgrade's install
    # and the restart of serve, and before a downgrade.
    return await _with_store(settings, run, any_schema=True, reads=True)


# --- parser --------------------------------------------------------------------------------------


def _outbox_id(text: str) -> str:
    """argparse type: outbox ids are numbers (a mistyped one is a usage error, not a crash)."""
    if not text.isascii() or not text.isdigit() or int(text) >= 2**63:
        raise argparse.ArgumentTypeError(f"not an outbox id (a number): {text!r}")
    return text


def _queue_id(text: str) -> str:
    """argparse type: a queue id is printable text (a byte that is not UTF-8, as a shell
    passes it, is a usage error; SQLite could not even take it)."""
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"not a queue id: {_shown(text)!r}")
    return text


def _positive(text: str) -> int:
    """argparse type: a count or a ticket number, 1 … 2**63 - 1 (SQLite's integers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"not a number from 1 up: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smtpgate", description=__doc__)
    p.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    p.set_defaults(needs_rules=False)
    sub = p.add_subparsers(dest="verb", required=True)

    sub.add_parser("serve", help="run the gateway").set_defaults(fn=cmd_serve, needs_rules=True)

    s = sub.add_parser("status", help="queue depth, outbox, counts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("explain", help="what would happen to a message (changes nothing)")
    s.add_argument("file")
    s.add_argument(
        "--mail-from", default=None, help="envelope sender (default: Return-Path:, else From:)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_explain, needs_rules=True)

    q = sub.add_parser("queue", help="inbound queue").add_subparsers(dest="action", required=True)
    s = q.add_parser("list")
    s.add_argument("--state", choices=["queued", "active", "done", "dead"])
    s.add_argument("--limit", type=_positive, default=50)
    s.add_argument("--json", action="store_true")
    s = q.add_parser("show")
    s.add_argument("id", type=_queue_id)
    s.add_argument("--json", action="store_true", help="(always JSON)")
    s.add_argument("--raw", action="store_true", help="print the stored message bytes")
    s = q.add_parser("retry", help="dead → queued")
    one = s.add_mutually_exclusive_group()
    one.add_argument("id", nargs="?", type=_queue_id)
    one.add_argument("--dead", action="store_true", help="every dead message")
    for a in q.choices.values():
        a.set_defaults(fn=cmd_queue)

    o = sub.add_parser("outbox", help="outgoing mail").add_subparsers(dest="action", required=True)
    s = o.add_parser("list")
    s.add_argument("--state", choices=["queued", "active", "done", "dead"])
    s.add_argument("--limit", type=_positive, default=50)
    s.add_argument("--json", action="store_true")
    s = o.add_parser("retry", help="dead → queued")
    one = s.add_mutually_exclusive_group()
    one.add_argument("id", nargs="?", type=_outbox_id)
    one.add_argument("--dead", action="store_true", help="every dead delivery")
    for a in o.choices.values():
        a.set_defaults(fn=cmd_outbox)

    tickets = sub.add_parser("tickets", help="tickets: list, show")
    t = tickets.add_subparsers(dest="action", required=True)
    s = t.add_parser("list")
    s.add_argument("--limit", type=_positive, default=100)
    s.add_argument("--json", action="store_true")
    s = t.add_parser("show")
    s.add_argument("number", type=_positive)
    s.add_argument("--json", action="store_true")
    for a in t.choices.values():
        a.set_defaults(fn=cmd_tickets)

    for kind in ("accounts", "contacts", "employees"):
        what = "import" + (", list" if kind == "accounts" else "")
        k = sub.add_parser(kind, help=f"{kind}: {what}").add_subparsers(
            dest="action", required=True
        )
        s = k.add_parser("import", help="CSV with a header row, or a JSON list")
        s.add_argument("file")
        s.set_defaults(fn=cmd_import, kind=kind)
        if kind == "accounts":
            s = k.add_parser("list")
            s.add_argument("--limit", type=_positive, default=1000)
            s.add_argument("--json", action="store_true")
            s.set_defaults(fn=cmd_accounts_list)

    s = sub.add_parser("rules", help="the precedence and rules in evaluation order")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_rules, needs_rules=True)

    s = sub.add_parser("backup", help="consistent online copy of the store")
    s.add_argument("path")
    s.set_defaults(fn=cmd_backup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a reader gone by then is handled below too
        return code
    except BrokenPipeError:
        # `smtpgate queue list --json | head`: the reader is gone, which is no error of ours.
        # Python would still flush stdout at exit into the closed pipe and print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # as a program ended by SIGPIPE reports it


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb == "status":
        try:
            code = fast_status(args.json)  # None: the full path below gives the answer
        except KeyboardInterrupt:
            return 130
        if code is not None:
            return code
    import asyncio

    from smtpgate.config import ConfigError, load_rules, load_settings

    settings = None
    try:
        settings = load_settings()
        # Only the verbs that decide anything read (and validate) the rules file; the others
        # start faster without it (`smtpgate status` is polled by monitoring).
        rules = load_rules(settings.rules_file) if args.needs_rules else None
    except ConfigError as exc:
        _start_up_error(exc, settings.log_format if settings else None)
        return 2
    setup_logging(settings)
    runner = _event_loop_runner() if args.verb == "serve" else asyncio.run
    try:
        result: int = runner(args.fn(settings, rules, args))
    except ConfigError as exc:
        _run_error(exc, settings)
        return 2
    except sqlite3.DatabaseError as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            # Another process held the write lock past the busy timeout: the transaction that
            # waited for it was not applied.
            _run_error(
                f"{settings.db_path} is locked by another process (a running import or"
                " backup?): try again",
                settings,
            )
            return 1
        if name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"):
            # A full disk (serve cannot requeue what it had in hand), a file size limit: what
            # the operator must mend is the disk, not the program.
            _run_error(
                f"cannot write the store {settings.db_path}: {exc} (disk full, or a file size"
                " limit?)",
                settings,
            )
            return 1
        if name not in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            raise
        _run_error(
            f"SMTPGATE_DATA_DIR: {settings.db_path} is not a readable smtpgate store: {exc}",
            settings,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    return result


def _run_error(message: object, settings: Settings) -> None:
    """An error that ends a verb once logging is set up: a log line with JSON logs, else one
    line on stderr."""
    if settings.log_format == "json":
        log.error("%s", message)
    else:
        print(f"smtpgate: {message}", file=sys.stderr)


def _start_up_error(exc: Exception, log_format: str | None) -> None:
    """A configuration error before logging is set up: with JSON logs asked for (by valid
    settings, or else by the variable itself), it is a JSON line like every other."""
    from smtpgate.config import requested_log_format

    if (log_format or requested_log_format()) == "json":
        record = logging.LogRecord("smtpgate", logging.ERROR, __file__, 0, "%s", (exc,), None)
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"smtpgate: {exc}", file=sys.stderr)


def _event_loop_runner() -> Callable[[Any], Any]:
    """uvloop when installed (`pip install smtpgate[fast]`), else the standard loop."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run
    runner: Callable[[Any], Any] = uvloop.run
    return runner


if __name__ == "__main__":
    raise SystemExit(main())
