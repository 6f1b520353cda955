"""store.records: applying XML transactions to a real SQLite file, all or nothing."""

from __future__ import annotations

import collections
import sqlite3
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import aiosqlite
import pytest

from smtpgate.model import Applied
from smtpgate.store import _in_thread, crm
from smtpgate.store.records import apply as apply_records
from smtpgate.store.schema import migrate
from smtpgate.xmlapi import Transaction, find_transaction

TABLES = ("accounts", "account_keys", "tickets", "history", "charges", "events", "assets", "items")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    conn = await aiosqlite.connect(tmp_path / "smtpgate.db", isolation_level=None)
    conn.row_factory = aiosqlite.Row
    await migrate(conn)
    await conn.execute("BEGIN IMMEDIATE")
    values = {"rec_id": "CRDACME0000000000001", "file_as": "Acme Corp"}
    await _in_thread(conn, lambda c: crm.save_account(c, values, "test"))
    await conn.execute("COMMIT")
    try:
        yield conn
    finally:
        await conn.close()


async def apply_transaction(
    db: aiosqlite.Connection, tx: Transaction, *, inbound_id: str | None = None
) -> Applied:
    """records.apply in the connection's thread, as the store runs it."""
    return await _in_thread(db, lambda c: apply_records(c, tx, inbound_id=inbound_id))


ACC = "CRDACME0000000000001"


def xml(kind: str, fields: dict[str, str], app: str | None = "Web form") -> Transaction:
    app_el = f"<ExternalApplicationName>{app}</ExternalApplicationName>" if app else ""
    body = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields.items())
    text = (
        f'<?xml version="1.0" encoding="utf-8"?><CommitCRMTransaction>{app_el}'
        f"<DataKind>{kind}</DataKind><RecordData>{body}</RecordData></CommitCRMTransaction>"
    )
    tx = find_transaction([text.encode()])
    assert tx is not None
    return tx


async def apply(db: aiosqlite.Connection, tx: Transaction, **kw: Any) -> Applied:
    await db.execute("BEGIN IMMEDIATE")
    try:
        applied = await apply_transaction(db, tx, **kw)
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")
    return applied


async def row(db: aiosqlite.Connection, table: str, rec_id: str) -> dict[str, Any]:
    async with db.execute(f"SELECT * FROM {table} WHERE rec_id = ?", (rec_id,)) as cur:
        found = await cur.fetchone()
    assert found is not None
    return dict(found)


async def counts(db: aiosqlite.Connection) -> dict[str, int]:
    out = {}
    for table in TABLES:
        async with db.execute(f"SELECT count(*) FROM {table}") as cur:
            found = await cur.fetchone()
        assert found is not None
        out[table] = int(found[0])
    return out


async def add_record(
    db: aiosqlite.Connection, kind: str, prefix: str, fields: dict[str, str], *, inbound_id: str
) -> tuple[Applied, str]:
    """Apply a transaction adding a `kind` record: status 1 and a new rec_id starting `prefix`."""
    applied = await apply(db, xml(kind, fields), inbound_id=inbound_id)
    assert applied.error_code == 1, applied.errors
    assert applied.record_kind == kind
    rec_id = applied.record_id
    assert rec_id is not None
    assert rec_id.startswith(prefix)
    return applied, rec_id


async def add_ticket(db: aiosqlite.Connection) -> str:
    applied = await apply(db, xml("TICKET", {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": "Printer"}))
    assert applied.record_id is not None
    return applied.record_id


# --- ACCOUNT ----------------------------------------------------------------------------------


async def test_account_add_then_update(db: aiosqlite.Connection) -> None:
    applied, rec_id = await add_record(
        db,
        "ACCOUNT",
        "CRD",
        {
            "FLDCRDFULLNAME": "  Globex  Corporation ",
            "FLDCRDEMAIL1": "Info@Globex.example",
            "FLDCRDCARDID2": "G-42",
            "FLDCRDUSER2": "site-7",
        },
        inbound_id="IN1",
    )
    assert applied.errors == ()
    assert len(rec_id) == 20
    account = await row(db, "accounts", rec_id)
    assert account["file_as"] == "Globex  Corporation"
    assert account["account_number"] == "G-42"
    assert account["field1"] == "site-7"
    assert account["created_by"] == account["updated_by"] == "Web form"

    async with db.execute(
        "SELECT field, value FROM account_keys WHERE account = ? ORDER BY field", (rec_id,)
    ) as cur:
        keys = {(r[0], r[1]) for r in await cur.fetchall()}
    assert ("file_as", "globex corporation") in keys
    assert ("email", "info@globex.example") in keys
    assert ("account_number", "g-42") in keys

    update = xml(
        "ACCOUNT",
        {"FLDCRDRECID": rec_id, "FLDCRDFULLNAME": "Globex Inc", "FLDCRDCARDID2": ""},
        app="CRM sync",
    )
    applied = await apply(db, update)
    assert (applied.error_code, applied.record_id) == (1, rec_id)
    account = await row(db, "accounts", rec_id)
    assert account["file_as"] == "Globex Inc"
    assert account["account_number"] is None  # an empty element clears the field
    assert account["email1"] == "Info@Globex.example"  # not given: unchanged
    assert account["created_by"] == "Web form"
    assert account["updated_by"] == "CRM sync"
    async with db.execute(
        "SELECT value FROM account_keys WHERE account = ? AND field = 'file_as'", (rec_id,)
    ) as cur:
        assert [r[0] for r in await cur.fetchall()] == ["globex inc"]


async def test_account_default_actor(db: aiosqlite.Connection) -> None:
    applied = await apply(db, xml("ACCOUNT", {"FLDCRDFULLNAME": "Initech"}, app=None))
    assert applied.record_id is not None
    assert (await row(db, "accounts", applied.record_id))["created_by"] == "API by Email"


# --- TICKET -----------------------------------------------------------------------------------


async def test_ticket_add_then_update(db: aiosqlite.Connection) -> None:
    applied, rec_id = await add_record(
        db,
        "TICKET",
        "TKT",
        {
            "FLDTKTCARDID": ACC,
            "FLDTKTPROBLEM": "Printer on 2nd floor",
            "FLDTKTPRIORITY": "10",
            "FLDTKTDUEDATETIME": "27/11/2026 09:00",
            "FLDTKTUSER1": "f1",
        },
        inbound_id="IN-7",
    )
    assert applied.ticket_number == 1
    assert applied.ticket_rec_id == rec_id
    ticket = await row(db, "tickets", rec_id)
    assert ticket["account"] == ACC
    assert ticket["description"] == "Printer on 2nd floor"
    assert ticket["source"] == "API by Email"
    assert ticket["status"] == 100
    assert ticket["priority"] == 10
    assert ticket["due_at"] == "2026-11-27T09:00:00Z"
    assert ticket["field1"] == "f1"
    assert ticket["inbound_id"] == "IN-7"
    assert ticket["created_by"] == "Web form"

    second = await apply(
        db,
        xml(
            "TICKET",
            {
                "FLDTKTCARDID": ACC,
                "FLDTKTPROBLEM": "Other",
                "FLDTKTSOURCE": "Web",
                "FLDTKTSTATUS": "200",
            },
        ),
    )
    assert second.ticket_number == 2
    assert second.record_id is not None
    other = await row(db, "tickets", second.record_id)
    assert (other["source"], other["status"]) == ("Web", 200)

    update = xml(
        "TICKET",
        {"FLDTKTRECID": rec_id, "FLDTKTSTATUS": "1000", "FLDTKTSOLUTION": "Replaced toner"},
        app="RMM",
    )
    applied = await apply(db, update)
    assert applied.error_code == 1
    assert (applied.ticket_rec_id, applied.ticket_number) == (rec_id, 1)
    ticket = await row(db, "tickets", rec_id)
    assert ticket["status"] == 1000
    assert ticket["solution"] == "Replaced toner"
    assert ticket["description"] == "Printer on 2nd floor"
    assert ticket["updated_by"] == "RMM"


# --- HISTORY-NOTE -----------------------------------------------------------------------------


async def test_history_note_on_ticket_then_update(db: aiosqlite.Connection) -> None:
    ticket = await add_ticket(db)
    _, rec_id = await add_record(
        db,
        "HISTORY-NOTE",
        "HIS",
        {
            "FLDHISLINKRECID": ticket,
            "FLDHISDESCRIPTION": "Called the customer",
            "FLDHISNOTEDATETIME": "2026-11-26 10:15",
            "FLDHISKIND": "Phone",
        },
        inbound_id="IN-9",
    )
    note = await row(db, "history", rec_id)
    assert note["ticket"] == ticket
    assert note["link_rec_id"] == ticket
    assert note["account"] == ACC  # taken from the ticket
    assert note["note_at"] == "2026-11-26T10:15:00Z"
    assert note["inbound_id"] == "IN-9"
    assert note["created_by"] == "Web form"

    assert note["updated_by"] == "Web form"

    applied = await apply(
        db,
        xml(
            "HISTORY-NOTE",
            {"FLDHISRECID": rec_id, "FLDHISDESCRIPTION": "Called twice"},
            app="CRM sync",
        ),
    )
    assert (applied.error_code, applied.record_id) == (1, rec_id)
    note = await row(db, "history", rec_id)
    assert note["description"] == "Called twice"
    assert note["kind"] == "Phone"
    assert (note["created_by"], note["updated_by"]) == ("Web form", "CRM sync")  # xml-api 1


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"FLDHISLINKRECID": ACC}, id="linked-to-account"),
        pytest.param({"FLDHISCARDID": ACC}, id="account-only"),
    ],
)
async def test_history_note_on_account(db: aiosqlite.Connection, fields: dict[str, str]) -> None:
    applied = await apply(db, xml("HISTORY-NOTE", {"FLDHISDESCRIPTION": "Visit", **fields}))
    assert applied.error_code == 1
    assert applied.record_id is not None
    note = await row(db, "history", applied.record_id)
    assert (note["ticket"], note["account"], note["link_rec_id"]) == (None, ACC, ACC)
    assert note["note_at"]  # defaults to now


# --- CHARGE, APPOINTMENT-OR-TASK, ASSET, ITEM -------------------------------------------------

GENERIC = [
    pytest.param(
        "CHARGE",
        "charges",
        "SLP",
        {
            "FLDSLPCARDID": ACC,
            "FLDSLPQUANTITY": "1.5",
            "FLDSLPPRICE": "80",
            "FLDSLPSLIPDATE": "2026-11-26",
            "FLDSLPBILLKIND": "b",
            "FLDSLPDESC": "Remote support",
        },
        {
            "account": ACC,
            "quantity": 1.5,
            "price": 80,
            "slip_date": "2026-11-26",
            "bill_kind": "B",
            "description": "Remote support",
        },
        {"FLDSLPQUANTITY": "2", "FLDSLPSTAGE": "d"},
        {"quantity": 2, "stage": "D", "price": 80},
        id="charge",
    ),
    pytest.param(
        "APPOINTMENT-OR-TASK",
        "events",
        "EVT",
        {
            "FLDEVTEVENTDATE": "30/11/2026",
            "FLDEVTFREETEXT": "On-site visit",
            "FLDEVTCARDID": ACC,
            "FLDEVTFROMTIME": "9:00",
            "FLDEVTDONE": "n",
        },
        {
            "event_date": "2026-11-30",
            "description": "On-site visit",
            "account": ACC,
            "from_time": "09:00:00",
            "done": "N",
        },
        {"FLDEVTDONE": "Y", "FLDEVTTOTIME": "10:30"},
        {"done": "Y", "to_time": "10:30:00", "description": "On-site visit"},
        id="appointment-or-task",
    ),
    pytest.param(
        "ASSET",
        "assets",
        "AST",
        {
            "FLDASTASSETTYPE": "H",
            "FLDASTSTATUS": "A",
            "FLDASTACCRECID": ACC,
            "FLDASTNAME": "Laptop",
            "FLDASTWARREXPDATE": "2028-01-31",
            "FLDASTUSER5": "u5",
        },
        {
            "asset_type": "H",
            "status": "A",
            "account": ACC,
            "name": "Laptop",
            "warranty_expires": "2028-01-31",
            "field5": "u5",
        },
        {"FLDASTSERIALNO": "SN-1", "FLDASTQUANTITY": "3"},
        {"serial_no": "SN-1", "quantity": 3, "name": "Laptop"},
        id="asset",
    ),
    pytest.param(
        "ITEM",
        "items",
        "ITM",
        {"FLDITMITEMNO": "LAB-1", "FLDITMNAME": "Labour", "FLDITMUNITPRICE": "95.50"},
        {"item_no": "LAB-1", "name": "Labour", "unit_price": 95.5},
        {"FLDITMSUSPENDED": "y", "FLDITMUNITPRICE": ""},
        {"suspended": "Y", "unit_price": None, "name": "Labour"},
        id="item",
    ),
]


@pytest.mark.parametrize(("kind", "table", "prefix", "add", "added", "change", "changed"), GENERIC)
async def test_generic_kind_add_then_update(
    db: aiosqlite.Connection,
    kind: str,
    table: str,
    prefix: str,
    add: dict[str, str],
    added: dict[str, Any],
    change: dict[str, str],
    changed: dict[str, Any],
) -> None:
    _, rec_id = await add_record(db, kind, prefix, add, inbound_id="IN-1")
    stored = await row(db, table, rec_id)
    assert {k: stored[k] for k in added} == added
    assert stored["created_by"] == stored["updated_by"] == "Web form"
    assert stored["inbound_id"] == "IN-1"

    rec_field = {"charges": "FLDSLPRECID", "events": "FLDEVTRECID", "assets": "FLDASTRECID",
                 "items": "FLDITMRECID"}[table]  # fmt: skip
    applied = await apply(db, xml(kind, {rec_field: rec_id, **change}, app="Sync"))
    assert (applied.error_code, applied.record_id) == (1, rec_id)
    stored = await row(db, table, rec_id)
    assert {k: stored[k] for k in changed} == changed
    assert stored["updated_by"] == "Sync"
    assert stored["created_by"] == "Web form"


async def test_charge_on_ticket(db: aiosqlite.Connection) -> None:
    ticket = await add_ticket(db)
    applied = await apply(
        db, xml("CHARGE", {"FLDSLPCARDID": ACC, "FLDSLPQUANTITY": "1", "FLDSLPTICKETID": ticket})
    )
    assert applied.error_code == 1
    assert applied.record_id is not None
    assert (await row(db, "charges", applied.record_id))["ticket"] == ticket


# --- failures change nothing ------------------------------------------------------------------

MISSING = "CRDNOSUCHACCOUNT0000"
MISSING_TKT = "TKTNOSUCHTICKET00000"

FAILURES = [
    pytest.param(
        "TICKET", {"FLDTKTCARDID": MISSING, "FLDTKTPROBLEM": "x"},
        [(150010, "FLDTKTCARDID")], id="ticket-account-missing",
    ),
    pytest.param(
        "CHARGE", {"FLDSLPCARDID": MISSING, "FLDSLPQUANTITY": "1", "FLDSLPTICKETID": MISSING_TKT},
        [(150010, "FLDSLPCARDID"), (150010, "FLDSLPTICKETID")], id="charge-refs-missing",
    ),
    pytest.param(
        "HISTORY-NOTE", {"FLDHISDESCRIPTION": "x", "FLDHISLINKRECID": MISSING_TKT},
        [(150010, "FLDHISLINKRECID")], id="history-link-missing",
    ),
    pytest.param(
        "HISTORY-NOTE", {"FLDHISDESCRIPTION": "x", "FLDHISCARDID": MISSING},
        [(150010, "FLDHISCARDID")], id="history-account-missing",
    ),
    pytest.param(
        "ASSET", {"FLDASTASSETTYPE": "H", "FLDASTSTATUS": "A", "FLDASTACCRECID": MISSING},
        [(150010, "FLDASTACCRECID")], id="asset-account-missing",
    ),
    pytest.param(
        "APPOINTMENT-OR-TASK",
        {"FLDEVTEVENTDATE": "2026-11-26", "FLDEVTFREETEXT": "x", "FLDEVTCARDID": MISSING,
         "FLDEVTLINKRECID": MISSING_TKT},
        [(150010, "FLDEVTCARDID"), (150010, "FLDEVTLINKRECID")], id="event-refs-missing",
    ),
    pytest.param(
        "TICKET", {"FLDTKTCARDID": MISSING, "FLDTKTPROBLEM": "x", "FLDTKTFOO": "y"},
        [(150002, "FLDTKTFOO"), (150010, "FLDTKTCARDID")], id="parse-and-reference-errors",
    ),
    pytest.param(
        "TICKET", {"FLDTKTRECID": MISSING_TKT, "FLDTKTPRIORITY": "5"},
        [(150003, "FLDTKTRECID")], id="update-missing-ticket",
    ),
    pytest.param(
        "ACCOUNT", {"FLDCRDRECID": MISSING, "FLDCRDCITY": "Springfield"},
        [(150003, "FLDCRDRECID")], id="update-missing-account",
    ),
    pytest.param(
        "ITEM", {"FLDITMRECID": "ITMNOSUCHITEM0000000", "FLDITMNAME": "x"},
        [(150003, "FLDITMRECID")], id="update-missing-item",
    ),
    pytest.param(
        "CHARGE", {"FLDSLPRECID": "SLPNOSUCHCHARGE00000", "FLDSLPCARDID": MISSING},
        [(150010, "FLDSLPCARDID"), (150003, "FLDSLPRECID")], id="update-missing-and-bad-ref",
    ),
    pytest.param(
        "OPPORTUNITY", {"FLDOPPNAME": "x"}, [(150009, None)], id="unsupported-kind",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "fields", "expected"), FAILURES)
async def test_failures_change_nothing(
    db: aiosqlite.Connection,
    kind: str,
    fields: dict[str, str],
    expected: list[tuple[int, str | None]],
) -> None:
    before = await counts(db)
    applied = await apply(db, xml(kind, fields))
    assert applied.error_code == expected[0][0]
    assert [(code, field) for code, field, _ in applied.errors] == expected
    assert all(message for _, _, message in applied.errors)
    assert applied.record_id is None
    assert applied.record_kind == kind
    assert await counts(db) == before


async def test_failed_update_leaves_record_untouched(db: aiosqlite.Connection) -> None:
    ticket = await add_ticket(db)
    before = await row(db, "tickets", ticket)
    tx = xml("TICKET", {"FLDTKTRECID": ticket, "FLDTKTPRIORITY": "1", "FLDTKTCARDID": MISSING})
    applied = await apply(db, tx)
    assert applied.error_code == 150010
    assert await row(db, "tickets", ticket) == before


async def test_failure_keeps_the_callers_own_writes(db: aiosqlite.Connection) -> None:
    await db.execute("BEGIN IMMEDIATE")
    await db.execute("INSERT INTO seen_messages VALUES ('k1', 'IN1', 0)")
    applied = await apply_transaction(db, xml("TICKET", {"FLDTKTCARDID": MISSING}))
    assert applied.error_code == 150010
    await db.execute("COMMIT")
    async with db.execute("SELECT count(*) FROM seen_messages") as cur:
        found = await cur.fetchone()
    assert found is not None
    assert found[0] == 1


async def test_refused_document_is_rejected_without_sql(db: aiosqlite.Connection) -> None:
    tx = find_transaction([b'<?xml version="1.0"?><!DOCTYPE x><CommitCRMTransaction/>'])
    assert tx is not None
    applied = await apply(db, tx)
    assert applied.error_code == 150012
    assert applied.record_kind is None


async def test_values_are_bound_not_formatted(db: aiosqlite.Connection) -> None:
    evil = "x'); DROP TABLE tickets; --"
    applied = await apply(db, xml("TICKET", {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": evil}))
    assert applied.record_id is not None
    assert (await row(db, "tickets", applied.record_id))["description"] == evil


async def test_sqlite_errors_propagate_and_release_the_savepoint(
    db: aiosqlite.Connection,
) -> None:
    await db.execute("BEGIN IMMEDIATE")
    await db.execute("DROP TABLE items")
    with pytest.raises(sqlite3.OperationalError):
        await apply_transaction(db, xml("ITEM", {"FLDITMITEMNO": "1", "FLDITMNAME": "n"}))
    await db.execute("ROLLBACK")  # the caller's transaction is still ours to end
    applied = await apply(db, xml("ITEM", {"FLDITMITEMNO": "1", "FLDITMNAME": "n"}))
    assert applied.error_code == 1


def test_rec_ids_have_rangermsps_shape_and_every_character_is_equally_likely() -> None:
    ids = [crm.new_rec_id("TKT") for _ in range(50_000)]
    assert all(len(i) == 20 and i.startswith("TKT") for i in ids)
    assert len(set(ids)) == len(ids)
    counts = collections.Counter("".join(i[3:] for i in ids))
    assert set(counts) == set(string.ascii_uppercase + string.digits)
    # 850,000 characters: ~23,600 each, a standard deviation of ~150. Mapping every random byte
    # with `% 36` would make four characters 8/7 as likely as the rest (ratio 1.14).
    assert max(counts.values()) / min(counts.values()) < 1.08
