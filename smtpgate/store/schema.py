"""The store's schema as an ordered list of migrations, each applied once in a transaction."""

from __future__ import annotations

import contextlib
import sqlite3
import unicodedata
from collections.abc import Callable

import aiosqlite

from smtpgate.config import ConfigError


def _account_keys_in_nfc(db: sqlite3.Connection) -> None:
    """Keys are compared in Unicode NFC since this version: compose the non-ASCII keys stored
    before (an account imported decomposed, as macOS writes text, would never match again).
    Self-contained on purpose: a migration must not change when application code does."""
    rows = db.execute(
        "SELECT rowid, value FROM account_keys WHERE value GLOB '*[^ -~]*'"
    ).fetchall()
    db.executemany(
        "UPDATE account_keys SET value = ? WHERE rowid = ?",
        [(unicodedata.normalize("NFC", value), rowid) for rowid, value in rows],
    )


# Append only: a migration that has shipped is never edited. Each entry is (version, name,
# step): SQL, or a function run over the sqlite3 connection inside the migration's transaction.
MIGRATIONS: list[tuple[int, str, str | Callable[[sqlite3.Connection], None]]] = [
    (
        1,
        "queue, outbox and CRM core",
        """
        CREATE TABLE inbound (
            id              TEXT PRIMARY KEY,
            received_at     REAL NOT NULL,
            peer            TEXT NOT NULL DEFAULT '',
            helo            TEXT NOT NULL DEFAULT '',
            mail_from       TEXT NOT NULL,
            rcpt_tos        TEXT NOT NULL,          -- JSON list
            size            INTEGER NOT NULL,
            message_id      TEXT,
            raw             BLOB,                   -- NULL once retention removed it
            state           TEXT NOT NULL DEFAULT 'queued',
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            lease_until     REAL,
            lease_token     TEXT,
            last_error      TEXT,
            outcome         TEXT,                   -- JSON, spec 5 keys
            processed_at    REAL
        );
        CREATE INDEX inbound_ready ON inbound (state, next_attempt_at);
        CREATE INDEX inbound_received ON inbound (received_at);

        -- Queue depth per state kept by triggers, so status is O(1) with millions of rows.
        CREATE TABLE queue_counts (
            tbl   TEXT NOT NULL,
            state TEXT NOT NULL,
            n     INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (tbl, state)
        ) WITHOUT ROWID;
        INSERT INTO queue_counts (tbl, state)
            VALUES ('inbound','queued'),('inbound','active'),('inbound','done'),('inbound','dead'),
                   ('outbox','queued'),('outbox','active'),('outbox','done'),('outbox','dead');
        CREATE TRIGGER inbound_count_ins AFTER INSERT ON inbound BEGIN
            UPDATE queue_counts SET n = n + 1 WHERE tbl = 'inbound' AND state = NEW.state;
        END;
        CREATE TRIGGER inbound_count_upd AFTER UPDATE OF state ON inbound
            WHEN OLD.state <> NEW.state BEGIN
            UPDATE queue_counts SET n = n - 1 WHERE tbl = 'inbound' AND state = OLD.state;
            UPDATE queue_counts SET n = n + 1 WHERE tbl = 'inbound' AND state = NEW.state;
        END;
        CREATE TRIGGER inbound_count_del AFTER DELETE ON inbound BEGIN
            UPDATE queue_counts SET n = n - 1 WHERE tbl = 'inbound' AND state = OLD.state;
        END;

        CREATE TABLE outbox (
            id              INTEGER PRIMARY KEY,
            inbound_id      TEXT,
            kind            TEXT NOT NULL,
            mail_from       TEXT NOT NULL,
            recipients      TEXT NOT NULL,          -- JSON list
            message_id      TEXT,
            data            BLOB NOT NULL,
            state           TEXT NOT NULL DEFAULT 'queued',
            attempts        INTEGER NOT NULL DEFAULT 0,
            created_at      REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            lease_until     REAL,
            last_error      TEXT,
            sent_at         REAL
        );
        CREATE INDEX outbox_ready ON outbox (state, next_attempt_at);
        CREATE INDEX outbox_inbound ON outbox (inbound_id);
        CREATE TRIGGER outbox_count_ins AFTER INSERT ON outbox BEGIN
            UPDATE queue_counts SET n = n + 1 WHERE tbl = 'outbox' AND state = NEW.state;
        END;
        CREATE TRIGGER outbox_count_upd AFTER UPDATE OF state ON outbox
            WHEN OLD.state <> NEW.state BEGIN
            UPDATE queue_counts SET n = n - 1 WHERE tbl = 'outbox' AND state = OLD.state;
            UPDATE queue_counts SET n = n + 1 WHERE tbl = 'outbox' AND state = NEW.state;
        END;
        CREATE TRIGGER outbox_count_del AFTER DELETE ON outbox BEGIN
            UPDATE queue_counts SET n = n - 1 WHERE tbl = 'outbox' AND state = OLD.state;
        END;

        -- spec 2.4: a Message-ID (or content hash) is processed once.
        CREATE TABLE seen_messages (
            key        TEXT PRIMARY KEY,
            inbound_id TEXT NOT NULL,
            seen_at    REAL NOT NULL
        ) WITHOUT ROWID;

        -- Message-IDs the gateway sent or filed for a ticket (threading by In-Reply-To).
        CREATE TABLE message_links (
            message_id TEXT PRIMARY KEY,
            ticket     TEXT NOT NULL
        ) WITHOUT ROWID;

        -- Automatic mails per recipient, for the hourly cap.
        CREATE TABLE auto_mail_log (
            recipient TEXT NOT NULL,
            sent_at   REAL NOT NULL
        );
        CREATE INDEX auto_mail_recipient ON auto_mail_log (recipient, sent_at);

        CREATE TABLE accounts (
            rec_id         TEXT PRIMARY KEY,
            file_as        TEXT NOT NULL,
            company        TEXT, contact TEXT, last_name TEXT, dear TEXT,
            account_number TEXT, account_id TEXT,
            field1 TEXT, field2 TEXT, field3 TEXT, field4 TEXT,
            email1 TEXT, email2 TEXT,
            address1 TEXT, address2 TEXT, address3 TEXT, city TEXT, state TEXT, country TEXT,
            zip TEXT, phone TEXT, phone2 TEXT, phone3 TEXT, phone4 TEXT, fax TEXT,
            url1 TEXT, url2 TEXT, kind TEXT, notes TEXT, status TEXT, title TEXT,
            department TEXT, manager TEXT,
            created_by TEXT, updated_by TEXT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL
        );
        CREATE INDEX accounts_file_as ON accounts (file_as COLLATE NOCASE);

        -- Normalized lookup keys (spec 2.1 step 3): one indexed probe per candidate value,
        -- never a scan of all accounts. field: file_as, account_number, account_id,
        -- field1..field4, rec_id, email (account or contact address), domain.
        CREATE TABLE account_keys (
            field   TEXT NOT NULL,
            value   TEXT NOT NULL,
            account TEXT NOT NULL,
            contact TEXT
        );
        CREATE INDEX account_keys_lookup ON account_keys (field, value);
        CREATE INDEX account_keys_account ON account_keys (account);

        CREATE TABLE contacts (
            rec_id     TEXT PRIMARY KEY,
            account    TEXT NOT NULL REFERENCES accounts (rec_id),
            name       TEXT,
            email      TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX contacts_account ON contacts (account);

        CREATE TABLE employees (
            rec_id     TEXT PRIMARY KEY,
            name       TEXT NOT NULL,
            email1     TEXT,
            email2     TEXT,
            active     INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX employees_email1 ON employees (email1);
        CREATE INDEX employees_email2 ON employees (email2);

        CREATE TABLE tickets (
            rec_id      TEXT PRIMARY KEY,
            number      INTEGER NOT NULL UNIQUE,
            account     TEXT NOT NULL REFERENCES accounts (rec_id),
            contact     TEXT,
            asset       TEXT,
            worker      TEXT,
            description TEXT NOT NULL,
            details     TEXT NOT NULL DEFAULT '',
            status      INTEGER NOT NULL DEFAULT 100,
            priority    INTEGER,
            kind        TEXT,
            source      TEXT,
            due_at      TEXT,
            solution    TEXT,
            estimated_duration TEXT,
            field1      TEXT,
            inbound_id  TEXT,
            created_by  TEXT,
            updated_by  TEXT,
            created_at  TEXT NOT NULL,
            updated_at  TEXT NOT NULL
        );
        CREATE INDEX tickets_account ON tickets (account);

        CREATE TABLE history (
            rec_id      TEXT PRIMARY KEY,
            ticket      TEXT,
            account     TEXT,
            link_rec_id TEXT,
            note_at     TEXT NOT NULL,
            description TEXT NOT NULL,
            kind        TEXT,
            worker      TEXT,
            contact     TEXT,
            field1      TEXT,
            inbound_id  TEXT,                      -- link to the raw message
            attachments TEXT,                      -- JSON list of {filename, content_type, size}
            created_by  TEXT,
            created_at  TEXT NOT NULL,
            updated_at  TEXT NOT NULL
        );
        CREATE INDEX history_ticket ON history (ticket);
        CREATE INDEX history_link ON history (link_rec_id);
        """,
    ),
    (
        2,
        "XML record kinds",
        """
        -- xml-api.md 3: the kinds the XML API adds and updates besides accounts/tickets/history.
        -- Numbers are NUMERIC, dates ISO text, flags 'Y'/'N'; inbound_id links the raw message.
        CREATE TABLE charges (
            rec_id         TEXT PRIMARY KEY,
            account        TEXT NOT NULL REFERENCES accounts (rec_id),
            worker         TEXT,
            item           TEXT,
            ticket         TEXT,
            slip_date      TEXT,
            description    TEXT,
            quantity       NUMERIC NOT NULL,
            hours_amount   NUMERIC,
            adjust_amount  NUMERIC,
            adjust_percent NUMERIC,
            start_time     TEXT,
            end_time       TEXT,
            price          NUMERIC,
            bill_kind      TEXT,
            stage          TEXT,
            field1         TEXT,
            inbound_id     TEXT,
            created_by     TEXT,
            updated_by     TEXT,
            created_at     TEXT NOT NULL,
            updated_at     TEXT NOT NULL
        );
        CREATE INDEX charges_account ON charges (account);
        CREATE INDEX charges_ticket ON charges (ticket);

        CREATE TABLE events (
            rec_id      TEXT PRIMARY KEY,
            event_type  TEXT,
            worker      TEXT,
            account     TEXT,
            contact     TEXT,
            done        TEXT,
            event_date  TEXT NOT NULL,
            description TEXT NOT NULL,
            from_time   TEXT,
            to_time     TEXT,
            link_rec_id TEXT,
            inbound_id  TEXT,
            created_by  TEXT,
            updated_by  TEXT,
            created_at  TEXT NOT NULL,
            updated_at  TEXT NOT NULL
        );
        CREATE INDEX events_account ON events (account);
        CREATE INDEX events_link ON events (link_rec_id);

        CREATE TABLE assets (
            rec_id           TEXT PRIMARY KEY,
            asset_code       TEXT,
            asset_type       TEXT NOT NULL,
            name             TEXT,
            status           TEXT NOT NULL,
            serial_no        TEXT,
            account          TEXT NOT NULL REFERENCES accounts (rec_id),
            contact          TEXT,
            description      TEXT,
            location         TEXT,
            manufacturer     TEXT,
            model            TEXT,
            notes            TEXT,
            quantity         NUMERIC,
            version          TEXT,
            warranty_expires TEXT,
            license_code     TEXT,
            license_keys     TEXT,
            field1 TEXT, field2 TEXT, field3 TEXT, field4 TEXT, field5 TEXT,
            inbound_id       TEXT,
            created_by       TEXT,
            updated_by       TEXT,
            created_at       TEXT NOT NULL,
            updated_at       TEXT NOT NULL
        );
        CREATE INDEX assets_account ON assets (account);

        CREATE TABLE items (
            rec_id          TEXT PRIMARY KEY,
            item_type_group TEXT,
            item_no         TEXT NOT NULL,
            name            TEXT NOT NULL,
            unit_is_hour    TEXT,
            unit_price      NUMERIC,
            standard_cost   NUMERIC,
            description     TEXT,
            suspended       TEXT,
            notes           TEXT,
            field1          TEXT,
            inbound_id      TEXT,
            created_by      TEXT,
            updated_by      TEXT,
            created_at      TEXT NOT NULL,
            updated_at      TEXT NOT NULL
        );
        CREATE INDEX items_item_no ON items (item_no);
        """,
    ),
    (
        3,
        "index for the oldest queued message",
        """
        -- status's "oldest queued age" (min received_at of queued rows) without scanning every
        -- queued row: 210 ms → 0.1 ms with 1,000,000 queued (docs/performance.md). Partial, so
        -- it holds only the queued rows.
        CREATE INDEX inbound_queued_received ON inbound (received_at) WHERE state = 'queued';
        """,
    ),
    (
        4,
        "raw bytes in a table of their own",
        """
        -- SQLite rewrites a whole row, overflow pages included, on every UPDATE: with the raw
        -- bytes in the queue row, each claim and completion of a 25 MB message rewrote 25 MB.
        -- Kept apart, state changes touch a few hundred bytes; retention deletes the bytes row.
        CREATE TABLE inbound_raw (
            id  TEXT PRIMARY KEY,
            raw BLOB NOT NULL
        );
        INSERT INTO inbound_raw (id, raw) SELECT id, raw FROM inbound WHERE raw IS NOT NULL;
        ALTER TABLE inbound DROP COLUMN raw;
        """,
    ),
    (5, "account keys in Unicode NFC", _account_keys_in_nfc),
    (
        6,
        "who last changed a history note",
        """
        -- xml-api 1: ExternalApplicationName is recorded as the record's creator/updater; the
        -- history table kept only its creator. NULL for notes no transaction has changed.
        ALTER TABLE history ADD COLUMN updated_by TEXT;
        """,
    ),
    (
        7,
        "outbox data in a table of its own",
        """
        -- As migration 4 for the inbound raw bytes: SQLite rewrites a whole row on every UPDATE,
        -- so each claim, delivery record, retry and recovery of a 25 MB forward rewrote 25 MB
        -- (and a statement's journal held the old pages of every row it changed). The size
        -- stays in the row for the claims' byte budget; purge deletes both rows.
        ALTER TABLE outbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
        UPDATE outbox SET size = length(data);
        CREATE TABLE outbox_data (
            id   INTEGER PRIMARY KEY,
            data BLOB NOT NULL
        );
        INSERT INTO outbox_data (id, data) SELECT id, data FROM outbox;
        ALTER TABLE outbox DROP COLUMN data;
        """,
    ),
    (
        8,
        "crashes of a message processed alone",
        """
        -- Store.recover: a message processed alone (claim_alone) when the process died is
        -- charged the crash; after SMTPGATE_PROCESS_MAX_ATTEMPTS of them it goes dead.
        ALTER TABLE inbound ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
        """,
    ),
]


def check_version(current: int, *, apply: bool) -> None:
    """ConfigError for a store this smtpgate must not use as it is: one that needs a migration
    when `apply` is False, one written by a newer smtpgate always."""
    known = MIGRATIONS[-1][0]
    if 0 < current < known and not apply:  # 0: an empty file, no schema to write the old way
        raise ConfigError(
            f"SMTPGATE_DATA_DIR: the store has schema version {current} and this smtpgate needs"
            f" {known}: restart `smtpgate serve` with this version (it upgrades the store at"
            " start), then run this command again"
        )
    if current > known:
        # An older smtpgate on a newer store (a downgrade, or two versions side by side) would
        # write rows the newer schema does not expect, or fail on every intake.
        raise ConfigError(
            f"SMTPGATE_DATA_DIR: the store was written by a newer smtpgate (schema version"
            f" {current}; this version knows up to {known}): run that version, or restore a"
            " backup made with this one"
        )


async def migrate(db: aiosqlite.Connection, *, apply: bool = True) -> int:
    """Apply pending migrations in order, each in its own transaction; return the version.

    With `apply` False, a store that needs a migration is refused instead: only `serve` (and a
    command that makes a new store) migrates. A backup timer or an operator's command run
    between installing a new version and restarting `serve` would otherwise change the schema
    under the old `serve`, which still writes the old way."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    async with db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    check_version(current, apply=apply)
    for version, name, step in MIGRATIONS:
        if version <= current:
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            if callable(step):
                # In the connection's own thread, like every store transaction (store._in_thread).
                await db._execute(step, db._conn)  # type: ignore[no-untyped-call]
            else:
                # executescript would COMMIT implicitly; run statement by statement instead.
                for statement in _split_sql(step):
                    await db.execute(statement)
            await db.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, datetime('now'))", (version, name)
            )
            await db.execute("COMMIT")
        except BaseException:
            # Not when SQLite rolled back already (an I/O error, a full disk): "cannot
            # rollback - no transaction is active" would hide what went wrong.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
            raise
        current = version
    return current


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (BEGIN ... END;) whole."""
    statements: list[str] = []
    buf: list[str] = []
    in_trigger = False
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].strip()
        if not stripped:
            continue
        buf.append(line)
        upper = stripped.upper()
        if upper.startswith("CREATE TRIGGER"):
            in_trigger = True
        if in_trigger:
            if upper == "END;":
                in_trigger = False
                statements.append("\n".join(buf))
                buf = []
        elif stripped.endswith(";"):
            statements.append("\n".join(buf))
            buf = []
    if buf:
        statements.append("\n".join(buf))
    return statements
