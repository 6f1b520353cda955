"""CRM records (accounts, contacts, employees, tickets, history notes): SQL inside a transaction.

Plain synchronous functions over a `sqlite3.Connection`: the store runs them in its connection's
thread, a whole transaction per hand-off (`store._in_thread`). Every function expects the caller
to have begun a transaction; none commits.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from smtpgate.model import nfc, normalize_key

_ALPHABET = string.ascii_uppercase + string.digits

# spec 2.1 step 3: searched fields of an account, as stored in account_keys.
SEARCH_FIELDS = (
    "file_as", "account_number", "account_id", "field1", "field2", "field3", "field4", "rec_id",
)  # fmt: skip

ACCOUNT_COLUMNS = (
    "rec_id", "file_as", "company", "contact", "last_name", "dear", "account_number",
    "account_id", "field1", "field2", "field3", "field4", "email1", "email2", "address1",
    "address2", "address3", "city", "state", "country", "zip", "phone", "phone2", "phone3",
    "phone4", "fax", "url1", "url2", "kind", "notes", "status", "title", "department", "manager",
    "created_by", "updated_by",
)  # fmt: skip


_REC_ID_LENGTH = 17
_UNBIASED = 256 - 256 % len(_ALPHABET)  # random bytes below this map evenly onto the alphabet


def new_rec_id(prefix: str) -> str:
    """RangerMSP's shape: a 3-letter kind prefix and 17 random upper-case alphanumerics.

    One read of the OS's random source per id (secrets.choice made one per character: 40 µs an
    id, in the writer's thread, twice per ticket); bytes from _UNBIASED up are dropped so that
    every character stays equally likely.
    """
    chars = ""
    while len(chars) < _REC_ID_LENGTH:
        chars += "".join(
            _ALPHABET[b % len(_ALPHABET)] for b in secrets.token_bytes(24) if b < _UNBIASED
        )
    return prefix + chars[:_REC_ID_LENGTH]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def address_value(value: Any) -> str:
    """An address or domain as a sender's is looked up: lower case, composed (NFC), without a
    root dot ("acme.example." and a decomposed "bücher.example" matched no sender)."""
    return nfc(str(value or "").strip().lower()).rstrip(".")


def _account_keys(row: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    for field in SEARCH_FIELDS:
        value = row.get(field)
        if value:
            yield field, normalize_key(str(value))
    for field in ("email1", "email2"):
        value = address_value(row.get(field))
        if "@" in value.lstrip("@"):  # "@example.com" is a domain, not an address
            yield "email", value
        elif value and "." in value:
            # spec 2.1: a bare domain stored as an account email value matches by domain.
            yield "domain", value.lstrip("@")


def refresh_account_keys(db: sqlite3.Connection, rec_id: str) -> None:
    """Rebuild the lookup keys of one account and of its contacts."""
    db.execute("DELETE FROM account_keys WHERE account = ?", (rec_id,))
    row = db.execute("SELECT * FROM accounts WHERE rec_id = ?", (rec_id,)).fetchone()
    if row is None:
        return
    keys = [(f, v, rec_id, None) for f, v in _account_keys(dict(row))]
    for contact_id, email in db.execute(
        "SELECT rec_id, email FROM contacts WHERE account = ? AND email IS NOT NULL", (rec_id,)
    ).fetchall():
        email = address_value(email)
        if "@" in email:
            keys.append(("email", email, rec_id, contact_id))
    db.executemany(
        "INSERT INTO account_keys (field, value, account, contact) VALUES (?, ?, ?, ?)", keys
    )


def account_named(db: sqlite3.Connection, file_as: str) -> str | None:
    """The account whose file_as is this name as account detection compares names (spec
    2.1.3: case-insensitive, white space collapsed, Unicode composed); of several, the oldest
    (the keys' own rows are written anew whenever an account's keys are refreshed)."""
    found = db.execute(
        "SELECT k.account FROM account_keys k JOIN accounts a ON a.rec_id = k.account"
        " WHERE k.field = 'file_as' AND k.value = ? ORDER BY a.rowid LIMIT 1",
        (normalize_key(file_as),),
    ).fetchone()
    return str(found[0]) if found else None


def save_account(db: sqlite3.Connection, values: Mapping[str, Any], actor: str) -> str:
    """Insert or update an account matched on rec_id, else file_as (as `account_named`)."""
    values = {k: v for k, v in values.items() if k in ACCOUNT_COLUMNS}
    rec_id: str | None = values.get("rec_id") or None
    if rec_id is None and values.get("file_as"):
        rec_id = account_named(db, str(values["file_as"]))
    now = now_iso()
    if rec_id and account_exists(db, rec_id):
        cols = [c for c in values if c != "rec_id"]
        if cols:
            assignments = ", ".join(f"{c} = ?" for c in cols)
            db.execute(
                f"UPDATE accounts SET {assignments}, updated_by = ?, updated_at = ? "
                "WHERE rec_id = ?",
                (*(values[c] for c in cols), actor, now, rec_id),
            )
        refresh_account_keys(db, rec_id)
        return rec_id
    rec_id = rec_id or new_rec_id("CRD")
    row = {**values, "rec_id": rec_id, "created_by": actor, "updated_by": actor}
    cols = list(row)
    db.execute(
        f"INSERT INTO accounts ({', '.join(cols)}, created_at, updated_at) "
        f"VALUES ({', '.join('?' for _ in cols)}, ?, ?)",
        (*row.values(), now, now),
    )
    refresh_account_keys(db, rec_id)
    return rec_id


def account_exists(db: sqlite3.Connection, rec_id: str) -> bool:
    return db.execute("SELECT 1 FROM accounts WHERE rec_id = ?", (rec_id,)).fetchone() is not None


def ticket_exists(db: sqlite3.Connection, rec_id: str) -> bool:
    return db.execute("SELECT 1 FROM tickets WHERE rec_id = ?", (rec_id,)).fetchone() is not None


def create_ticket(
    db: sqlite3.Connection,
    *,
    account: str,
    description: str,
    details: str,
    source: str,
    contact: str | None = None,
    inbound_id: str | None = None,
    actor: str = "smtpgate",
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, int]:
    """Create a ticket (status 100 New unless extra says otherwise); return (rec_id, number)."""
    rec_id = new_rec_id("TKT")
    now = now_iso()
    row: dict[str, Any] = {
        "rec_id": rec_id,
        "account": account,
        "contact": contact,
        "description": description,
        "details": details,
        "status": 100,
        "source": source,
        "inbound_id": inbound_id,
        "created_by": actor,
        "updated_by": actor,
        "created_at": now,
        "updated_at": now,
    }
    row.update(extra or {})
    # The next number from the UNIQUE index, in the same statement. Safe without a sequence
    # table: all writes go through one connection inside BEGIN IMMEDIATE.
    next_number = "(SELECT coalesce(max(number), 0) + 1 FROM tickets)"
    rows = db.execute(
        f"INSERT INTO tickets ({', '.join(row)}, number)"
        f" VALUES ({', '.join('?' for _ in row)}, {next_number}) RETURNING number",
        tuple(row.values()),
    ).fetchall()  # all of it: a RETURNING statement is finished only when fully stepped
    return rec_id, int(rows[0][0])


def add_history(
    db: sqlite3.Connection,
    *,
    description: str,
    ticket: str | None = None,
    account: str | None = None,
    inbound_id: str | None = None,
    attachments: Iterable[Mapping[str, Any]] = (),
    kind: str = "Email",
    actor: str = "smtpgate",
) -> str:
    rec_id = new_rec_id("HIS")
    now = now_iso()
    db.execute(
        "INSERT INTO history (rec_id, ticket, account, link_rec_id, note_at, description, kind,"
        " inbound_id, attachments, created_by, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            rec_id,
            ticket,
            account,
            ticket or account,
            now,
            description,
            kind,
            inbound_id,
            json.dumps(list(attachments)) if attachments else None,
            actor,
            now,
            now,
        ),
    )
    return rec_id
