"""Applying an XML API transaction (xml-api.md) to the CRM tables: all of it or nothing.

Runs inside the caller's write transaction, fenced by a savepoint so that a rejected transaction
leaves no trace. Synchronous over a `sqlite3.Connection`, like crm.py: the store runs it in its
connection's thread. Column and table names come only from the static `xmlapi.KINDS` tables;
every value is bound as a parameter (xml-api.md 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Mapping
from typing import Any

from smtpgate import xmlapi
from smtpgate.model import Applied
from smtpgate.store import crm
from smtpgate.xmlapi import KindSpec, Transaction, ValueType, XmlError

TICKET_SOURCE = "API by Email"


def apply(db: sqlite3.Connection, tx: Transaction, *, inbound_id: str | None = None) -> Applied:
    """Add or update the transaction's record; on any problem change nothing and list them all.

    Never raises for bad input; sqlite errors propagate (the caller retries them as 1100).
    """
    kind = tx.kind
    errors = list(tx.errors)
    if kind is None:
        if not errors:
            errors.append(XmlError(xmlapi.ERR_KIND, None, "data kind unknown or not supported"))
        return _failed(tx, errors)

    db.execute("SAVEPOINT xmltx")
    try:
        errors.extend(_check_references(db, tx))
        rec_id = tx.rec_id
        if rec_id is not None and not _exists(db, kind.table, rec_id):
            errors.append(
                XmlError(
                    xmlapi.ERR_NO_RECORD, kind.rec_id_field, f"no {kind.name} with this REC ID"
                )
            )
        if errors:
            db.execute("ROLLBACK TO xmltx")
            db.execute("RELEASE xmltx")
            return _failed(tx, errors)
        if rec_id is None:
            applied = _add(db, kind, tx, inbound_id)
        else:
            applied = _update(db, kind, tx, rec_id)
        db.execute("RELEASE xmltx")
        return dataclasses.replace(applied, account=_account_of(db, kind, applied.record_id))
    except BaseException:
        # Undo our part only; the original error is what the caller must see.
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK TO xmltx")
            db.execute("RELEASE xmltx")
        raise


# The record tables that belong to an account (items are the MSP's own catalogue).
_ACCOUNT_COLUMN = frozenset({"tickets", "history", "charges", "events", "assets"})


def _account_of(db: sqlite3.Connection, kind: KindSpec, rec_id: str | None) -> str | None:
    """The account of the record a transaction added or changed, for its outcome."""
    if kind is xmlapi.ACCOUNT:
        return rec_id
    if rec_id is None or kind.table not in _ACCOUNT_COLUMN:
        return None
    # `kind.table` comes from the static KINDS table, never from the message.
    row = db.execute(f"SELECT account FROM {kind.table} WHERE rec_id = ?", (rec_id,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def _failed(tx: Transaction, errors: list[XmlError]) -> Applied:
    return Applied(
        record_kind=tx.data_kind,
        error_code=errors[0].code,
        errors=tuple(e.as_tuple() for e in errors),
    )


def _exists(db: sqlite3.Connection, table: str, rec_id: str) -> bool:
    # `table` comes from the static KINDS table, never from the message.
    return db.execute(f"SELECT 1 FROM {table} WHERE rec_id = ?", (rec_id,)).fetchone() is not None


def _check_references(db: sqlite3.Connection, tx: Transaction) -> list[XmlError]:
    """xml-api.md 3: referenced accounts and tickets must exist."""
    errors: list[XmlError] = []
    for name, ref_type, target in xmlapi.references(tx):
        if ref_type is ValueType.ACCOUNT_REF:
            if not crm.account_exists(db, target):
                errors.append(XmlError(xmlapi.ERR_INVALID, name, "no account with this REC ID"))
        elif ref_type is ValueType.TICKET_REF:
            if not crm.ticket_exists(db, target):
                errors.append(XmlError(xmlapi.ERR_INVALID, name, "no ticket with this REC ID"))
        elif not (crm.ticket_exists(db, target) or crm.account_exists(db, target)):
            errors.append(
                XmlError(xmlapi.ERR_INVALID, name, "no ticket or account with this REC ID")
            )
    return errors


def _insert(db: sqlite3.Connection, table: str, row: Mapping[str, Any]) -> None:
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))


def _ticket_account(db: sqlite3.Connection, ticket: str) -> str | None:
    row = db.execute("SELECT account FROM tickets WHERE rec_id = ?", (ticket,)).fetchone()
    return str(row[0]) if row else None


def _ticket_number(db: sqlite3.Connection, ticket: str) -> int | None:
    row = db.execute("SELECT number FROM tickets WHERE rec_id = ?", (ticket,)).fetchone()
    return int(row[0]) if row else None


def _history_links(db: sqlite3.Connection, values: dict[str, Any], *, adding: bool) -> None:
    """A note's link names a ticket or an account: fill the ticket and account columns from it."""
    link = values.get("link_rec_id")
    if link:
        if crm.ticket_exists(db, link):
            values["ticket"] = link
            if not values.get("account") and (adding or "account" not in values):
                values["account"] = _ticket_account(db, link)
        else:
            values["ticket"] = None
            if not values.get("account") and (adding or "account" not in values):
                values["account"] = link
    elif adding and values.get("account"):
        values["link_rec_id"] = values["account"]  # as crm.add_history does
    elif "link_rec_id" in values:
        values["ticket"] = None  # the link was emptied


def _add(
    db: sqlite3.Connection, kind: KindSpec, tx: Transaction, inbound_id: str | None
) -> Applied:
    # Empty optional fields are simply not written; NOT NULL columns keep their defaults.
    values = {c: v for c, v in xmlapi.column_values(tx).items() if v is not None}
    now = crm.now_iso()
    actor = tx.actor
    if kind is xmlapi.TICKET:
        source = values.pop("source", None) or TICKET_SOURCE
        contact = values.pop("contact", None)
        ticket_id, number = crm.create_ticket(
            db,
            account=str(values.pop("account")),
            description=str(values.pop("description")),
            details="",
            source=str(source),
            contact=None if contact is None else str(contact),
            inbound_id=inbound_id,
            actor=actor,
            extra=values,
        )
        return Applied(
            ticket_number=number,
            ticket_rec_id=ticket_id,
            record_kind=kind.name,
            record_id=ticket_id,
            error_code=xmlapi.OK,
        )

    rec_id = crm.new_rec_id(kind.rec_id_prefix)
    row: dict[str, Any] = {"rec_id": rec_id, **values}
    if kind is xmlapi.HISTORY_NOTE:
        _history_links(db, row, adding=True)
        row.setdefault("note_at", now)
    if kind is not xmlapi.ACCOUNT:
        row["inbound_id"] = inbound_id
    row["created_by"] = actor
    row["updated_by"] = actor
    row["created_at"] = now
    row["updated_at"] = now
    _insert(db, kind.table, row)
    if kind is xmlapi.ACCOUNT:
        crm.refresh_account_keys(db, rec_id)
    return Applied(record_kind=kind.name, record_id=rec_id, error_code=xmlapi.OK)


def _update(db: sqlite3.Connection, kind: KindSpec, tx: Transaction, rec_id: str) -> Applied:
    # Only the given fields change; an empty element clears an optional field.
    values: dict[str, Any] = dict(xmlapi.column_values(tx))
    if kind is xmlapi.HISTORY_NOTE:
        _history_links(db, values, adding=False)
    values["updated_at"] = crm.now_iso()
    values["updated_by"] = tx.actor
    assignments = ", ".join(f"{column} = ?" for column in values)
    db.execute(
        f"UPDATE {kind.table} SET {assignments} WHERE rec_id = ?", (*values.values(), rec_id)
    )
    if kind is xmlapi.ACCOUNT:
        crm.refresh_account_keys(db, rec_id)
    if kind is xmlapi.TICKET:
        return Applied(
            ticket_number=_ticket_number(db, rec_id),
            ticket_rec_id=rec_id,
            record_kind=kind.name,
            record_id=rec_id,
            error_code=xmlapi.OK,
        )
    return Applied(record_kind=kind.name, record_id=rec_id, error_code=xmlapi.OK)
