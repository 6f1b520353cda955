"""xmlapi: finding, parsing and validating CommitCRMTransactions (xml-api.md), pure."""

from __future__ import annotations

import codecs
import time
from datetime import UTC
from pathlib import Path
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from smtpgate import xmlapi
from smtpgate.xmlapi import (
    KINDS,
    Transaction,
    XmlError,
    find_transaction,
    password_ok,
    response_xml,
)

ACC = "CRDACME0000000000001"
TKT = "TKTAAAA0000000000001"

# Minimal fields to add one record of each supported kind.
ADD_FIELDS: dict[str, dict[str, str]] = {
    "ACCOUNT": {"FLDCRDFULLNAME": "Acme Corp"},
    "TICKET": {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": "Printer broken"},
    "HISTORY-NOTE": {"FLDHISDESCRIPTION": "Called back", "FLDHISLINKRECID": TKT},
    "CHARGE": {"FLDSLPCARDID": ACC, "FLDSLPQUANTITY": "1.5"},
    "APPOINTMENT-OR-TASK": {"FLDEVTEVENTDATE": "2026-11-26", "FLDEVTFREETEXT": "Visit"},
    "ASSET": {"FLDASTASSETTYPE": "H", "FLDASTSTATUS": "A", "FLDASTACCRECID": ACC},
    "ITEM": {"FLDITMITEMNO": "LAB-1", "FLDITMNAME": "Labour"},
}


def doc(
    kind: str | None,
    fields: dict[str, str] | None = None,
    *,
    envelope: str | None = None,
    decl: bool = True,
) -> str:
    if envelope is None:
        envelope = (
            "<ExternalApplicationName>Web form</ExternalApplicationName>"
            "<SendResponseToEmail> Forms@Example.COM </SendResponseToEmail>"
            "<Password>s3cret</Password>"
            "<ReturnTransactionID>WEB-1</ReturnTransactionID>"
        )
    kind_el = "" if kind is None else f"<DataKind>{kind}</DataKind>"
    body = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (fields or {}).items())
    head = (
        '<?xml version="1.0" encoding="utf-8"?>\n<?commitcrmxml version="1.0"?>\n' if decl else ""
    )
    return (
        f"{head}<CommitCRMTransaction>{envelope}{kind_el}"
        f"<RecordData>{body}</RecordData></CommitCRMTransaction>"
    )


def parse(text: str | bytes) -> Transaction:
    data = text.encode("utf-8") if isinstance(text, str) else text
    tx = find_transaction([data])
    assert tx is not None
    return tx


def codes(tx: Transaction) -> list[tuple[int, str | None]]:
    return [(e.code, e.field) for e in tx.errors]


# --- every kind, add and update ---------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ADD_FIELDS), ids=list(ADD_FIELDS))
def test_add_each_kind(kind: str) -> None:
    tx = parse(doc(kind, ADD_FIELDS[kind]))
    assert tx.ok, tx.errors
    assert tx.data_kind == kind
    assert tx.rec_id is None
    assert dict(tx.fields) == ADD_FIELDS[kind]
    assert tx.app_name == "Web form"
    assert tx.response_to == "Forms@example.com"
    assert tx.password == "s3cret"
    assert tx.return_id == "WEB-1"


@pytest.mark.parametrize("kind", list(ADD_FIELDS), ids=list(ADD_FIELDS))
def test_update_each_kind_needs_only_rec_id(kind: str) -> None:
    spec = KINDS[kind]
    rec_id = spec.rec_id_prefix + "X" * 17
    tx = parse(doc(kind, {spec.rec_id_field: rec_id}))
    assert tx.ok, tx.errors
    assert tx.rec_id == rec_id


@pytest.mark.parametrize("kind", list(ADD_FIELDS), ids=list(ADD_FIELDS))
def test_numeric_kind_code(kind: str) -> None:
    tx = parse(doc(str(KINDS[kind].code), ADD_FIELDS[kind]))
    assert tx.ok
    assert tx.data_kind == kind


def test_kind_specs_are_consistent() -> None:
    prefixes = {k.rec_id_prefix for k in KINDS.values()}
    assert prefixes == {"CRD", "TKT", "HIS", "SLP", "EVT", "AST", "ITM"}
    for kind in KINDS.values():
        for group in kind.required:
            assert all(name in kind.fields for name in group)
        assert kind.rec_id_field not in kind.fields


# --- lenient reading --------------------------------------------------------------------------

TICKET_ADD = doc("TICKET", ADD_FIELDS["TICKET"])

VARIANTS = [
    pytest.param(TICKET_ADD.replace("DataKind", "Datakind"), id="Datakind"),
    pytest.param(TICKET_ADD.replace("DataKind", "DATAKIND"), id="DATAKIND"),
    pytest.param(TICKET_ADD.replace("RecordData", "recorddata"), id="recorddata"),
    pytest.param(
        TICKET_ADD.replace("CommitCRMTransaction", "commitcrmtransaction"), id="root-lower"
    ),
    pytest.param(TICKET_ADD.replace("FLDTKT", "fldtkt"), id="field-lower"),
    pytest.param(TICKET_ADD.replace("FLDTKTPROBLEM", "FldTktProblem"), id="field-mixed"),
    pytest.param(TICKET_ADD.replace(">TICKET<", "> ticket <"), id="kind-lower-spaced"),
    pytest.param("\ufeff" + TICKET_ADD, id="utf8-bom"),
    pytest.param(" \r\n\t\n" + TICKET_ADD, id="leading-whitespace"),
    pytest.param("\ufeff\r\n  " + TICKET_ADD, id="bom-then-whitespace"),
    pytest.param(doc("TICKET", ADD_FIELDS["TICKET"], decl=False), id="no-declaration"),
    pytest.param(TICKET_ADD + "\n\n-- \nSent from my phone\n", id="trailing-footer"),
    pytest.param(
        TICKET_ADD.replace("<DataKind>", "<Unknown>x</Unknown><!-- note --><DataKind>").replace(
            "Printer broken", "  <![CDATA[Printer broken]]>  "
        ),
        id="comment-cdata-unknown-envelope",
    ),
]


@pytest.mark.parametrize("text", VARIANTS)
def test_case_and_whitespace_variants(text: str) -> None:
    tx = parse(text)
    assert tx.ok, tx.errors
    assert tx.data_kind == "TICKET"
    assert tx.fields == {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": "Printer broken"}


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [
        pytest.param("utf-16-le", codecs.BOM_UTF16_LE, id="utf16-le-bom"),
        pytest.param("utf-16-be", codecs.BOM_UTF16_BE, id="utf16-be-bom"),
        pytest.param("utf-16-le", b"", id="utf16-le-no-bom"),
        pytest.param("utf-32-le", codecs.BOM_UTF32_LE, id="utf32-le-bom"),
    ],
)
def test_utf16(encoding: str, bom: bytes) -> None:
    text = TICKET_ADD.replace('encoding="utf-8"', 'encoding="utf-16"').replace("broken", "kaputt ä")
    tx = parse(bom + text.encode(encoding))
    assert tx.ok, tx.errors
    assert tx.fields["FLDTKTPROBLEM"] == "Printer kaputt ä"


def test_declared_latin1() -> None:
    text = TICKET_ADD.replace('encoding="utf-8"', 'encoding="iso-8859-1"')
    tx = parse(text.replace("broken", "défectueux").encode("latin-1"))
    assert tx.fields["FLDTKTPROBLEM"] == "Printer défectueux"


def test_undeclared_legacy_charset_is_read_leniently() -> None:
    text = doc("TICKET", ADD_FIELDS["TICKET"], decl=False).replace("broken", "défectueux")
    tx = parse(text.encode("cp1252"))
    assert tx.fields["FLDTKTPROBLEM"] == "Printer défectueux"


def test_multiline_value_keeps_inner_lines() -> None:
    tx = parse(doc("TICKET", {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": "\n  line 1\nline 2  \n"}))
    assert tx.fields["FLDTKTPROBLEM"] == "line 1\nline 2"


def test_escaped_markup_in_values() -> None:
    tx = parse(doc("TICKET", {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": "<b>x</b> & 'y'"}))
    assert tx.fields["FLDTKTPROBLEM"] == "<b>x</b> & 'y'"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("forms@example.com", "forms@example.com", id="plain"),
        # The domain is lowered; the local part is kept as given (RFC 5321 2.4).
        pytest.param(" Forms@Example.COM ", "Forms@example.com", id="case-space"),
        pytest.param("Web <Forms@Example.com>", "Forms@example.com", id="display-name"),
        pytest.param("", None, id="empty"),
        pytest.param("not an address", None, id="garbage"),
        pytest.param("a@b.example, c@d.example", None, id="two"),
        pytest.param("a@b.example\r\nBcc: x@y.example", None, id="header-injection"),
    ],
)
def test_response_address(given: str, expected: str | None) -> None:
    envelope = f"<SendResponseToEmail>{escape(given)}</SendResponseToEmail>"
    tx = parse(doc("TICKET", ADD_FIELDS["TICKET"], envelope=envelope))
    assert tx.response_to == expected


def test_absent_envelope_elements_are_none() -> None:
    tx = parse(doc("TICKET", ADD_FIELDS["TICKET"], envelope=""))
    assert (tx.app_name, tx.response_to, tx.password, tx.return_id) == (None, None, None, None)
    assert tx.actor == "API by Email"


# --- validation errors ------------------------------------------------------------------------

ERROR_CASES = [
    pytest.param(
        "TICKET",
        {**ADD_FIELDS["TICKET"], "FLDTKTFOO": "x", "FLDBAR": "y"},
        [(150002, "FLDTKTFOO"), (150002, "FLDBAR")],
        id="unknown-fields-all-listed",
    ),
    pytest.param(
        "TICKET",
        {"FLDTKTPRIORITY": "10"},
        [(150010, "FLDTKTCARDID"), (150010, "FLDTKTPROBLEM")],
        id="ticket-required-missing",
    ),
    pytest.param(
        "TICKET",
        {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": ""},
        [(150010, "FLDTKTPROBLEM")],
        id="required-empty",
    ),
    pytest.param(
        "ACCOUNT", {"FLDCRDCOMPANY": "x"}, [(150010, "FLDCRDFULLNAME")], id="account-required"
    ),
    pytest.param(
        "HISTORY-NOTE",
        {"FLDHISDESCRIPTION": "x"},
        [(150010, "FLDHISLINKRECID")],
        id="history-needs-link-or-account",
    ),
    pytest.param(
        "CHARGE", {"FLDSLPCARDID": ACC}, [(150010, "FLDSLPQUANTITY")], id="charge-required"
    ),
    pytest.param(
        "ASSET",
        {"FLDASTACCRECID": ACC},
        [(150010, "FLDASTASSETTYPE"), (150010, "FLDASTSTATUS")],
        id="asset-required",
    ),
    pytest.param("ITEM", {"FLDITMNAME": "x"}, [(150010, "FLDITMITEMNO")], id="item-required"),
    pytest.param(
        "APPOINTMENT-OR-TASK",
        {"FLDEVTFREETEXT": "x"},
        [(150010, "FLDEVTEVENTDATE")],
        id="event-required",
    ),
    pytest.param(
        "TICKET",
        {**ADD_FIELDS["TICKET"], "FLDTKTTICKETNO": "7"},
        [(150010, "FLDTKTTICKETNO")],
        id="ticket-number-read-only",
    ),
    pytest.param(
        "TICKET",
        {**ADD_FIELDS["TICKET"], "FLDTKTDUEDATETIME": "2026-02-30"},
        [(150010, "FLDTKTDUEDATETIME")],
        id="bad-date",
    ),
    pytest.param(
        "TICKET",
        {**ADD_FIELDS["TICKET"], "FLDTKTDUEDATETIME": "tomorrow"},
        [(150010, "FLDTKTDUEDATETIME")],
        id="bad-date-word",
    ),
    pytest.param(
        "TICKET",
        {**ADD_FIELDS["TICKET"], "FLDTKTPRIORITY": "high"},
        [(150010, "FLDTKTPRIORITY")],
        id="bad-integer",
    ),
    pytest.param(
        "CHARGE",
        {"FLDSLPCARDID": ACC, "FLDSLPQUANTITY": "1,5", "FLDSLPPRICE": "1e3"},
        [(150010, "FLDSLPQUANTITY"), (150010, "FLDSLPPRICE")],
        id="bad-numbers",
    ),
    pytest.param(
        "CHARGE",
        {"FLDSLPCARDID": ACC, "FLDSLPQUANTITY": "١٢"},  # Arabic-Indic digits
        [(150010, "FLDSLPQUANTITY")],
        id="non-ascii-digits",
    ),
    pytest.param(
        "CHARGE",
        {"FLDSLPCARDID": ACC, "FLDSLPQUANTITY": "9" * 40},
        [(150010, "FLDSLPQUANTITY")],
        id="huge-number",
    ),
    pytest.param(
        "ITEM",
        {**ADD_FIELDS["ITEM"], "FLDITMSUSPENDED": "yes"},
        [(150010, "FLDITMSUSPENDED")],
        id="bad-flag",
    ),
    pytest.param(
        "CHARGE",
        {**ADD_FIELDS["CHARGE"], "FLDSLPBILLKIND": "X"},
        [(150010, "FLDSLPBILLKIND")],
        id="bad-bill-kind",
    ),
    pytest.param(
        "APPOINTMENT-OR-TASK",
        {**ADD_FIELDS["APPOINTMENT-OR-TASK"], "FLDEVTFROMTIME": "25:00"},
        [(150010, "FLDEVTFROMTIME")],
        id="bad-time",
    ),
    pytest.param(
        "TICKET",
        {"FLDTKTRECID": TKT, "FLDTKTSTATUS": ""},
        [(150010, "FLDTKTSTATUS")],
        id="update-cannot-empty-status",
    ),
    pytest.param(
        "TICKET",
        {"FLDTKTRECID": TKT, "FLDTKTPROBLEM": ""},
        [(150010, "FLDTKTPROBLEM")],
        id="update-cannot-empty-required",
    ),
    pytest.param(
        "HISTORY-NOTE",  # linked to nothing after it (it was applied)
        {"FLDHISRECID": "HIS" + "X" * 17, "FLDHISLINKRECID": "", "FLDHISCARDID": ""},
        [(150010, "FLDHISLINKRECID"), (150010, "FLDHISCARDID")],
        id="update-cannot-empty-both-links",
    ),
    pytest.param("TICKET", {"FLDTKTRECID": ""}, [(150010, "FLDTKTRECID")], id="empty-rec-id"),
    pytest.param("OPPORTUNITY", {"FLDOPPNAME": "x"}, [(150009, None)], id="opportunity"),
    pytest.param("DOCUMENT", {}, [(150009, None)], id="document"),
    pytest.param("KBARTICLE", {}, [(150009, None)], id="kbarticle"),
    pytest.param("20", {}, [(150009, None)], id="opportunity-code"),
    pytest.param("INVOICE", ADD_FIELDS["TICKET"], [(150009, None)], id="unknown-kind"),
    pytest.param("55", {}, [(150009, None)], id="unknown-code"),
    pytest.param(None, ADD_FIELDS["TICKET"], [(150009, None)], id="kind-missing"),
]


@pytest.mark.parametrize(("kind", "fields", "expected"), ERROR_CASES)
def test_validation_errors(
    kind: str | None, fields: dict[str, str], expected: list[tuple[int, str | None]]
) -> None:
    tx = parse(doc(kind, fields))
    assert not tx.ok
    assert codes(tx) == expected
    assert all(e.message for e in tx.errors)


def test_an_update_may_move_a_history_note_from_its_ticket_to_an_account() -> None:
    fields = {"FLDHISRECID": "HIS" + "X" * 17, "FLDHISLINKRECID": "", "FLDHISCARDID": ACC}
    assert parse(doc("HISTORY-NOTE", fields)).ok


def test_unsupported_kind_is_named_upper_case() -> None:
    assert parse(doc("Opportunity", {})).data_kind == "OPPORTUNITY"
    assert parse(doc("20", {})).data_kind == "OPPORTUNITY"


def test_duplicate_field() -> None:
    text = TICKET_ADD.replace("</RecordData>", "<FLDTKTPROBLEM>again</FLDTKTPROBLEM></RecordData>")
    tx = parse(text)
    assert codes(tx) == [(150010, "FLDTKTPROBLEM")]
    assert tx.fields["FLDTKTPROBLEM"] == "Printer broken"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(TICKET_ADD.replace("<RecordData>", "<RecordData/><RecordData>"), id="two"),
        pytest.param(TICKET_ADD.replace("<RecordData>", "<X>").replace("</RecordData>", "</X>"),
                     id="missing"),
    ],
)  # fmt: skip
def test_record_data_shape(text: str) -> None:
    """The document was read: a wrong shape is answered like a missing field (150010)."""
    tx = parse(text)
    assert (150010, None) in codes(tx)
    assert 150001 not in [e.code for e in tx.errors]
    assert tx.response_to == "Forms@example.com"


@pytest.mark.parametrize(
    ("given", "expected"),
    [("10", 10), ("10.0", 10), ("1000.00", 1000), ("-2.", -2), ("10.5", None), ("1e1", None),
     ("١٠", None), ("10.0.0", None)],
)  # fmt: skip
def test_whole_numbers_accept_decimals_without_a_fraction(given: str, expected: int | None) -> None:
    """xml-api 3: "numbers as decimals" — a priority of 10.0 is the whole number 10."""
    tx = parse(doc("TICKET", {**ADD_FIELDS["TICKET"], "FLDTKTPRIORITY": given}))
    if expected is None:
        assert codes(tx) == [(150010, "FLDTKTPRIORITY")]
    else:
        assert tx.ok
        assert xmlapi.column_values(tx)["priority"] == expected


@pytest.mark.parametrize("kind", ["²", "７０", "¹⁰"])
def test_a_data_kind_of_non_ascii_digits_is_unknown(kind: str) -> None:
    assert codes(parse(doc(kind, ADD_FIELDS["TICKET"]))) == [(150009, None)]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-11-26", "2026-11-26"),
        ("2026-1-6", "2026-01-06"),
        ("2026-11-26 09:30", "2026-11-26T09:30:00Z"),
        ("2026-11-26 09:30:15", "2026-11-26T09:30:15Z"),
        ("2026-11-26T09:30:15", "2026-11-26T09:30:15Z"),
        ("26/11/2026", "2026-11-26"),
        ("26/11/2026 17:05", "2026-11-26T17:05:00Z"),
        ("31/12/2026 23:59:59", "2026-12-31T23:59:59Z"),
        ("2026-13-01", None),
        ("32/01/2026", None),
        ("2026-11-26 24:00", None),
        ("11/26/2026", None),
        ("26.11.2026", None),
        ("", None),
        ("٢٠٢٦-11-26", None),  # Arabic-Indic digits: int() reads them, a date field must not
        ("26/11/٢٠٢٦", None),
    ],
)
def test_parse_date(given: str, expected: str | None) -> None:
    assert xmlapi.parse_date(given, UTC) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-11-26 09:30", "2026-11-26T08:30:00Z"),  # CET
        ("2026-07-01 09:30", "2026-07-01T07:30:00Z"),  # CEST
        ("31/12/2026 00:30", "2026-12-30T23:30:00Z"),
        ("2026-11-26", "2026-11-26"),  # a date alone is a day, in no zone
    ],
)
def test_a_date_and_time_without_a_zone_is_taken_in_the_api_zone_and_kept_in_utc(
    given: str, expected: str
) -> None:
    """They were stored as given, beside the gateway's own times in UTC: a ticket's history,
    ordered by its notes' times, listed a note an hour old after one written now (UTC+1)."""
    assert xmlapi.parse_date(given, ZoneInfo("Europe/Berlin")) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [("10", 10), ("-2", -2), ("1.5", 1.5), ("+0.25", 0.25), (".5", 0.5), ("1.", 1.0),
     ("1,5", None), ("1e3", None), ("NaN", None), ("inf", None), ("", None), ("1 0", None),
     # 20 minutes in hours as JavaScript, Python and .NET print it (xml-api 3: no precision)
     ("0.3333333333333333", 0.3333333333333333), ("0.30000000000000004", 0.30000000000000004),
     ("1.0000000000000", 1.0), ("0." + "3" * 41, None)],
)  # fmt: skip
def test_parse_number(given: str, expected: float | None) -> None:
    assert xmlapi.parse_number(given) == expected


def test_column_values_normalize() -> None:
    tx = parse(
        doc(
            "CHARGE",
            {
                "FLDSLPCARDID": ACC,
                "FLDSLPQUANTITY": "2",
                "FLDSLPPRICE": "9.95",
                "FLDSLPSLIPDATE": "26/11/2026 10:00",
                "FLDSLPSTARTTIME": "9:05",
                "FLDSLPBILLKIND": "b",
                "FLDSLPDESC": "",
            },
        )
    )
    assert tx.ok, tx.errors
    assert xmlapi.column_values(tx) == {
        "account": ACC,
        "quantity": 2,
        "price": 9.95,
        "slip_date": "2026-11-26T10:00:00Z",
        "start_time": "09:05:00",
        "bill_kind": "B",
        "description": None,
    }
    assert xmlapi.references(tx) == [("FLDSLPCARDID", xmlapi.ValueType.ACCOUNT_REF, ACC)]


def test_flags_case_insensitive() -> None:
    tx = parse(doc("ITEM", {**ADD_FIELDS["ITEM"], "FLDITMSUSPENDED": "y", "FLDITMUNITISHOUR": "N"}))
    assert tx.ok
    values = xmlapi.column_values(tx)
    assert (values["suspended"], values["unit_is_hour"]) == ("Y", "N")


# --- not a transaction, malformed -------------------------------------------------------------

NOT_TRANSACTIONS = [
    pytest.param([], id="no-candidates"),
    pytest.param([b""], id="empty"),
    pytest.param([b"Hello,\r\nmy printer is broken.\r\n"], id="plain-text"),
    pytest.param([b"<p>Hello</p>"], id="html-fragment"),
    pytest.param([b"<html><body>broken <b>printer</b></body></html>"], id="html"),
    pytest.param([b'<?xml version="1.0"?><invoice><total>1</total></invoice>'], id="other-xml"),
    pytest.param([b"<p>x</p><!DOCTYPE foo>"], id="doctype-in-non-xml"),
    pytest.param(
        [b'<?xml version="1.0"?><CommitCRMTransactionResponse><Status>1</Status>'
         b"</CommitCRMTransactionResponse>"],
        id="our-own-response",
    ),
    pytest.param([b"x" * 2_000_000], id="oversize-plain-text"),
    pytest.param([b"Hi", b"<a/>"], id="several"),
    # xml-api 1: a transaction only when the content's root element is CommitCRMTransaction.
    # Other XML, or text around one, is ordinary mail: a person reads it (a refusal would not
    # be answered, and the message would reach nobody).
    pytest.param([b'<?xml version="1.0"?>just text'], id="declaration-then-text"),
    pytest.param([b'<?xml version="1.0"?><broken'], id="declaration-then-garbage"),
    pytest.param([b"Please see:\n" + TICKET_ADD.encode()], id="text-before"),
    pytest.param(
        [b"Thanks, but:\n> <CommitCRMTransaction>\n> <DataKind>TICKET</DataKind>"],
        id="reply-quoting-one",
    ),
    pytest.param(
        [b'<?xml version="1.0"?><Wrapper><CommitCRMTransaction/></Wrapper>'], id="wrong-root"
    ),
    pytest.param([b"<!doctype x>\n<html/>"], id="doctype-any-root"),
    pytest.param([b"<!DOCTYPE html>\n<html><body>Printer broken</body></html>"], id="html-body"),
    pytest.param(
        [b'<?xml version="1.0"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN"'
         b' "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist><dict/></plist>'],
        id="plist-attachment",
    ),
    pytest.param([b'<?xml version="1.0"?><log><entry>disk full'], id="truncated-log"),
    pytest.param(
        [b'<!DOCTYPE export SYSTEM "export.dtd"><export><![CDATA[<CommitCRMTransaction>'
         b"]]></export>"],
        id="doctype-other-root-naming-ours-inside",
    ),
]  # fmt: skip


@pytest.mark.parametrize("candidates", NOT_TRANSACTIONS)
def test_not_a_transaction(candidates: list[bytes]) -> None:
    assert find_transaction(candidates) is None


MALFORMED = [
    pytest.param(TICKET_ADD.replace("</RecordData>", ""), id="unclosed"),
    pytest.param('<?xml version="1.0"?><CommitCRMTransaction><a></b>', id="mismatched"),
    pytest.param('<?xml version="1.0"?><CommitCRMTransaction><broken', id="truncated"),
    pytest.param(TICKET_ADD.replace("Printer broken", "a &undefined; b"), id="undefined-entity"),
    pytest.param(TICKET_ADD.replace("Printer broken", "a & b"), id="bare-ampersand"),
    pytest.param(TICKET_ADD.replace('encoding="utf-8"', 'encoding="x-nonsense"'), id="encoding"),
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed(text: str) -> None:
    tx = parse(text)
    assert codes(tx) == [(150001, None)]
    assert tx.response_to is None  # nothing is answered from a document that was not read


def test_invalid_utf8_with_declaration() -> None:
    tx = parse(TICKET_ADD.encode("utf-8").replace(b"broken", b"\xff\xfe broken"))
    assert codes(tx) == [(150001, None)]


def test_well_formed_candidate_wins_over_refused_one() -> None:
    broken = TICKET_ADD.replace("</RecordData>", "").encode()
    good = doc("ACCOUNT", ADD_FIELDS["ACCOUNT"]).encode()
    tx = find_transaction([b"hello", broken, good])
    assert tx is not None
    assert tx.ok
    assert tx.data_kind == "ACCOUNT"
    only_broken = find_transaction([b"hello", broken, b"<a/>"])
    assert only_broken is not None
    assert codes(only_broken) == [(150001, None)]


def test_first_transaction_wins() -> None:
    first = doc("ACCOUNT", ADD_FIELDS["ACCOUNT"]).encode()
    second = TICKET_ADD.encode()
    tx = find_transaction([second, first])
    assert tx is not None
    assert tx.data_kind == "TICKET"


# --- safety -----------------------------------------------------------------------------------

XXE_FILE = """<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<CommitCRMTransaction><DataKind>TICKET</DataKind><RecordData>
<FLDTKTCARDID>CRDACME0000000000001</FLDTKTCARDID><FLDTKTPROBLEM>&x;</FLDTKTPROBLEM>
</RecordData></CommitCRMTransaction>"""

XXE_NETWORK = XXE_FILE.replace("file:///etc/passwd", "http://127.0.0.1:9/evil")

XXE_PARAMETER = """<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY % p SYSTEM "http://127.0.0.1:9/evil.dtd"> %p;]>
<CommitCRMTransaction/>"""

XXE_EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE CommitCRMTransaction SYSTEM "file:///etc/passwd">
<CommitCRMTransaction/>"""

BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">\n'.replace("&lol0;", "&lol;")
        for i in range(1, 10)
    )
    + "]>\n<CommitCRMTransaction><RecordData><FLDTKTPROBLEM>&lol9;</FLDTKTPROBLEM>"
    "</RecordData></CommitCRMTransaction>"
)


def quadratic_blowup() -> str:
    # One 50 kB entity referenced ~19 000 times: ~1 GB if expanded, a 1 MB document.
    entity = "A" * 50_000
    refs = "&a;" * ((1_000_000 - len(entity)) // 3)
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE d [<!ENTITY a "{entity}">]>\n'
        f"<CommitCRMTransaction><RecordData><FLDTKTPROBLEM>{refs}</FLDTKTPROBLEM>"
        "</RecordData></CommitCRMTransaction>"
    )


UTF7_DOCTYPE = (
    '<?xml version="1.0" encoding="UTF-7"?>'
    "+ADw-+ACE-DOCTYPE foo +AFs-+ADw-+ACE-ENTITY x SYSTEM +ACI-file:///etc/passwd+ACI-+AD4-+AF0-+AD4-"
    "<CommitCRMTransaction/>"
)


UNSAFE = [
    pytest.param(XXE_FILE, id="xxe-file"),
    pytest.param(XXE_NETWORK, id="xxe-network"),
    pytest.param(XXE_PARAMETER, id="xxe-parameter-entity"),
    pytest.param(XXE_EXTERNAL_DTD, id="external-dtd"),
    pytest.param(BILLION_LAUGHS, id="billion-laughs"),
    pytest.param(quadratic_blowup(), id="quadratic-blowup-1mb"),
    pytest.param("<!DOCTYPE x><CommitCRMTransaction/>", id="bare-doctype"),
    pytest.param(UTF7_DOCTYPE, id="utf7-hidden-doctype"),
    pytest.param(
        "<CommitCRMTransaction><RecordData>" + "<a>" * 150 + "</a>" * 150
        + "</RecordData></CommitCRMTransaction>",
        id="deep-150",
    ),
    pytest.param(
        '<?xml version="1.0"?><CommitCRMTransaction>' + "<a>" * 100_000,
        id="deep-100000-unclosed",
    ),
    pytest.param(
        "<CommitCRMTransaction><RecordData>" + "<a/>" * 100_000
        + "</RecordData></CommitCRMTransaction>",
        id="many-elements",
    ),
    pytest.param(
        TICKET_ADD.replace("Printer broken", "x" * 1_100_000), id="oversize-transaction"
    ),
    pytest.param(
        '<?xml version="1.0"?><CommitCRMTransaction a="' + "x" * 2_000_000 + '"/>',
        id="huge-attribute",
    ),
]  # fmt: skip


@pytest.mark.parametrize("text", UNSAFE)
def test_refused_for_safety(text: str) -> None:
    tx = parse(text)
    assert codes(tx) == [(150012, None)]
    assert tx.fields == {}
    assert "root:" not in repr(tx)  # nothing of /etc/passwd leaked into the result


def test_depth_limit_boundary() -> None:
    # RecordData sits at depth 2; depth 100 in total is still accepted (then unknown field).
    nested = "<A>" * 97 + "</A>" * 97
    tx = parse(
        "<CommitCRMTransaction><DataKind>ITEM</DataKind><RecordData><FLDITMITEMNO>1</FLDITMITEMNO>"
        f"<FLDITMNAME>n</FLDITMNAME><X>{nested}</X></RecordData></CommitCRMTransaction>"
    )
    assert codes(tx) == [(150002, "X")]


@pytest.mark.parametrize(
    ("declaration", "charset"),
    [('<?xml version="1.0" encoding="utf-8"?>', "koi8_r"), ("", "koi8_r"), ("", "cp1251")],
)
def test_the_parts_charset_reads_what_the_declaration_cannot(
    declaration: str, charset: str
) -> None:
    """A text part re-encoded by a mail client: its MIME charset decides when the declared
    encoding (or, without one, UTF-8) does not fit the bytes."""
    text = doc("TICKET", {**ADD_FIELDS["TICKET"], "FLDTKTPROBLEM": "Принтер"}, decl=False)
    data = (declaration + text).encode(charset)
    tx = find_transaction([data], charsets=[charset])
    assert tx is not None
    assert tx.ok
    assert tx.fields["FLDTKTPROBLEM"] == "Принтер"
    without = find_transaction([data])  # the old reading: refused, or Windows-1252 mojibake
    assert without is None or without.fields.get("FLDTKTPROBLEM") != "Принтер"


@pytest.mark.parametrize("label", ["iso-8859-1", "koi8_r", "us-ascii", "cp1252"])
def test_utf8_bytes_are_read_as_utf8_whatever_the_label(label: str) -> None:
    """A single-byte label decodes UTF-8 bytes without an error, wrongly ("MÃ¼ller")."""
    text = doc("TICKET", {**ADD_FIELDS["TICKET"], "FLDTKTPROBLEM": "Drucker von Müller"})
    for declared in (text, text.replace('encoding="utf-8"', 'encoding="ISO-8859-1"')):
        tx = find_transaction([declared.encode()], charsets=[label])
        assert tx is not None
        assert tx.fields["FLDTKTPROBLEM"] == "Drucker von Müller", (label, declared[:40])


@pytest.mark.parametrize(
    ("document", "unsafe"),
    [
        # "<![CDATA[" inside a processing instruction must not hide the DOCTYPE after it
        ("<?x <![CDATA[ ?><!DOCTYPE CommitCRMTransaction [<!ENTITY e 'x'>]><!-- ]]> -->", True),
        ("<!-- <!DOCTYPE x> --><CommitCRMTransaction><![CDATA[<!DOCTYPE html>]]>", False),
        ("<CommitCRMTransaction><?pi <!DOCTYPE html> ?>", False),
        ("<CommitCRMTransaction><![CDATA[ no end <!DOCTYPE x>", True),
        ("<CommitCRMTransaction><? no end <!DOCTYPE x>", False),  # malformed: the parser's
    ],
)
def test_declarations_are_found_outside_cdata_comments_and_instructions(
    document: str, unsafe: bool
) -> None:
    assert xmlapi._declares(document) is unsafe


def test_other_transactions_in_the_message_are_counted_not_applied() -> None:
    """One transaction a message (the first readable one); the others are counted for the
    outcome's notes, a copy of the first is not (a body with the same document attached)."""
    first = TICKET_ADD.encode()
    second = doc("ACCOUNT", ADD_FIELDS["ACCOUNT"]).encode()
    tx = find_transaction([first, b"Hello", second, b"  " + first + b"\r\n"])
    assert tx is not None
    assert (tx.data_kind, tx.others) == ("TICKET", 1)
    alone = find_transaction([first, first])
    assert alone is not None
    assert alone.others == 0


def test_max_bytes_is_configurable() -> None:
    data = TICKET_ADD.encode()
    assert find_transaction([data], max_bytes=len(data)) is not None
    tx = find_transaction([data], max_bytes=len(data) - 1)
    assert tx is not None
    assert codes(tx) == [(150012, None)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=512), max_size=3))
def test_arbitrary_bytes_never_raise(candidates: list[bytes]) -> None:
    tx = find_transaction(candidates)
    assert tx is None or isinstance(tx, Transaction)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_inside_a_transaction_never_raise(junk: bytes) -> None:
    data = TICKET_ADD.encode().replace(b"Printer broken", junk)
    tx = find_transaction([data])
    assert tx is not None
    assert all(isinstance(e, XmlError) for e in tx.errors)


_XML_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00\ufffe\uffff\r").filter(
        lambda c: c >= " " or c in "\t\n"
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(_XML_TEXT)
def test_values_round_trip(value: str) -> None:
    tx = parse(doc("TICKET", {"FLDTKTCARDID": ACC, "FLDTKTPROBLEM": "x" + value + "x"}))
    assert tx.fields["FLDTKTPROBLEM"] == "x" + value + "x"


# --- password and response --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "configured", "expected"),
    [
        pytest.param("s3cret", None, True, id="none-configured"),
        pytest.param(None, None, True, id="none-configured-none-given"),
        pytest.param(None, "", True, id="empty-configured"),
        pytest.param("s3cret", "s3cret", True, id="match"),
        pytest.param("S3CRET", "s3cret", False, id="case-matters"),
        pytest.param("s3cre", "s3cret", False, id="prefix"),
        pytest.param("s3cretX", "s3cret", False, id="longer"),
        pytest.param(None, "s3cret", False, id="missing"),
        pytest.param("pässwörd", "pässwörd", True, id="non-ascii"),
    ],
)
def test_password_ok(given: str | None, configured: str | None, expected: bool) -> None:
    assert password_ok(Transaction(password=given), configured) is expected


def test_password_is_stripped_like_other_values() -> None:
    envelope = "<Password>  s3cret \n</Password>"
    tx = parse(doc("TICKET", ADD_FIELDS["TICKET"], envelope=envelope))
    assert password_ok(tx, "s3cret")


def test_response_success_shape() -> None:
    tx = parse(TICKET_ADD)
    data = response_xml(tx, status=1, rec_id="TKTTLCFP4TTEC9V8QZ8K", errors=[])
    assert data.startswith(b'<?xml version="1.0" encoding="utf-8"?>\n')
    root = etree.fromstring(data)
    assert root.tag == "CommitCRMTransactionResponse"
    assert [c.tag for c in root] == [
        "ExternalApplicationName",
        "ReturnTransactionID",
        "DataKind",
        "Status",
        "RecID",
        "Errors",
    ]
    assert root.findtext("ExternalApplicationName") == "Web form"
    assert root.findtext("ReturnTransactionID") == "WEB-1"
    assert root.findtext("DataKind") == "TICKET"
    assert root.findtext("Status") == "1"
    assert root.findtext("RecID") == "TKTTLCFP4TTEC9V8QZ8K"
    errors = root.find("Errors")
    assert errors is not None
    assert len(errors) == 0


def test_response_failure_lists_every_error_escaped() -> None:
    envelope = "<ExternalApplicationName>A &amp; B &lt;forms&gt;</ExternalApplicationName>"
    tx = parse(doc("TICKET", {"FLDTKTFOO": "x", "FLDTKTBAR": "y"}, envelope=envelope))
    data = response_xml(tx, status=tx.errors[0].code, rec_id="TKTX", errors=tx.errors)
    root = etree.fromstring(data)
    assert root.findtext("ExternalApplicationName") == "A & B <forms>"
    assert root.findtext("Status") == "150002"
    assert root.findtext("RecID") == ""
    assert root.findtext("ReturnTransactionID") == ""
    got = [(e.get("code"), e.get("field"), e.text) for e in root.iter("Error")]
    assert got == [
        ("150002", "FLDTKTFOO", "unknown field for TICKET"),
        ("150002", "FLDTKTBAR", "unknown field for TICKET"),
        ("150010", "FLDTKTCARDID", "required field missing"),
        ("150010", "FLDTKTPROBLEM", "required field missing"),
    ]


def test_response_for_unreadable_document() -> None:
    tx = parse(XXE_FILE)
    root = etree.fromstring(response_xml(tx, status=150012, rec_id=None, errors=tx.errors))
    assert root.findtext("Status") == "150012"
    error = root.find("Errors/Error")
    assert error is not None
    assert error.get("field") is None
    assert error.get("code") == "150012"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(XXE_FILE, id="xxe-file"),
        pytest.param(XXE_NETWORK, id="xxe-network"),
        pytest.param(XXE_PARAMETER, id="xxe-parameter-entity"),
        pytest.param(BILLION_LAUGHS, id="billion-laughs"),
        pytest.param(quadratic_blowup(), id="quadratic-blowup"),
    ],
)
def test_parser_itself_is_hardened(text: str) -> None:
    # Defence in depth: even past the DOCTYPE pre-scan, the parser resolves nothing.
    with pytest.raises(xmlapi._Refused) as refused:
        xmlapi._parse(text)
    assert refused.value.code in (150001, 150012)


def test_guide_lists_every_field() -> None:
    # Keep docs/xml-api.md honest: every field and column of every kind is documented.
    guide = (Path(__file__).parents[1] / "docs" / "xml-api.md").read_text(encoding="utf-8")
    for kind in KINDS.values():
        assert f"`{kind.name}`" in guide
        assert f"`{kind.rec_id_field}`" in guide
        for name, spec in kind.fields.items():
            assert f"| `{name}`" in guide, name
            assert f"`{spec.column}`" in guide, spec.column


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("jane@acme.example", False),
        ("acme.example", False),  # a domain: matches its senders (spec 2.1)
        ("@acme.example", False),
        ('"john smith"@acme.example', False),
        ("Jane Roe <jane@acme.example>", True),  # matched no sender, silently
        ("a@acme.example; b@acme.example", True),
        ("not an address", True),
    ],
)
def test_account_email_values_are_one_address_or_a_domain(value: str, error: bool) -> None:
    """As `accounts import` refuses them: an account's email value is what senders are
    matched with, and "Name <address>" or two addresses in one field match no one."""
    tx = parse(doc("ACCOUNT", {"FLDCRDFULLNAME": "Acme Corp", "FLDCRDEMAIL2": value}))
    assert codes(tx) == ([(150010, "FLDCRDEMAIL2")] if error else [])


@pytest.mark.parametrize(
    ("given", "zone", "expected"),
    [
        ("9999-12-31 23:59", "America/New_York", "9999-12-31T23:59:59Z"),
        ("9999-12-31 23:59", "Europe/Berlin", "9999-12-31T22:59:00Z"),
        ("0001-01-01 00:30", "Europe/Berlin", "0001-01-01T00:00:00Z"),
        ("0001-01-01 10:00", "America/New_York", "0001-01-01T14:56:02Z"),
    ],
)
def test_a_date_and_time_at_the_ends_of_the_calendar_stays_at_that_end(
    given: str, zone: str, expected: str
) -> None:
    """The usual "no end date", 9999-12-31 23:59, is past the last UTC time west of UTC:
    the conversion failed and the field was left out of a transaction answered as applied."""
    assert xmlapi.parse_date(given, ZoneInfo(zone)) == expected
    assert xmlapi.parse_date(given, None) is not None  # the machine's zone: converted or kept


def test_without_an_api_zone_a_date_and_time_is_taken_in_the_machines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Etc/GMT-2")  # UTC+2
    time.tzset()
    try:
        assert xmlapi.parse_date("2026-11-26 09:30", None) == "2026-11-26T07:30:00Z"
    finally:
        monkeypatch.undo()
        time.tzset()
