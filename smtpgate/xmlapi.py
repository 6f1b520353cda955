"""XML "API by Email" (spec 2.2, xml-api.md): find, parse and validate a CommitCRMTransaction.

Pure: bytes in, a `Transaction` (or None for ordinary mail) out; the SQL side is store/records.py.
The data kinds and their fields are data (`KINDS`), the only source of column names for the store.
"""

from __future__ import annotations

import codecs
import contextlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from email.utils import getaddresses
from enum import StrEnum
from types import MappingProxyType
from typing import Any, NamedTuple

from lxml import etree

from smtpgate.model import is_account_email

# xml-api.md section 2: result codes.
OK = 1
ERR_MALFORMED = 150001
ERR_UNKNOWN_FIELD = 150002
ERR_NO_RECORD = 150003
ERR_KIND = 150009
ERR_INVALID = 150010
ERR_PASSWORD = 150011
ERR_UNSAFE = 150012

DEFAULT_ACTOR = "API by Email"
MAX_BYTES = 1_048_576
MAX_DEPTH = 100  # a transaction is three levels deep; anything deeper is an attack or a mistake
MAX_ELEMENTS = 2_000  # the largest kind has ~40 fields
_HEAD = 4096
_CHUNK = 16_384


class ValueType(StrEnum):
    TEXT = "text"
    DATE = "date"  # YYYY-MM-DD, YYYY-MM-DD HH:MM[:SS], DD/MM/YYYY [HH:MM]
    TIME = "time"  # HH:MM[:SS], or any DATE form
    NUMBER = "number"  # a decimal: 10, 1.5, -2
    INTEGER = "integer"
    FLAG = "flag"  # Y / N
    EMAIL = "email"  # one address, or a domain (an account's, matched by sender domain)
    CHOICE = "choice"  # one of FieldSpec.choices (single letters, case-insensitive)
    ACCOUNT_REF = "account-ref"
    TICKET_REF = "ticket-ref"
    TICKET_OR_ACCOUNT_REF = "ticket-or-account-ref"
    READONLY = "readonly"  # known field that a transaction may not set


REF_TYPES = frozenset(
    {ValueType.ACCOUNT_REF, ValueType.TICKET_REF, ValueType.TICKET_OR_ACCOUNT_REF}
)


class FieldSpec(NamedTuple):
    column: str
    type: ValueType = ValueType.TEXT
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One DataKind of xml-api.md section 3, described as data."""

    name: str
    code: int
    table: str
    rec_id_field: str
    rec_id_prefix: str
    # Each group must have one non-empty member to add a record (HISTORY-NOTE: link or account).
    required: tuple[tuple[str, ...], ...]
    fields: Mapping[str, FieldSpec]
    # Stored NOT NULL with a default on add (ticket status 100, note time now): never emptied.
    not_empty: frozenset[str] = frozenset()

    def may_empty(self, name: str) -> bool:
        return name not in self.not_empty and (name,) not in self.required

    def known(self, name: str) -> bool:
        return name == self.rec_id_field or name in self.fields


_D, _TM, _N, _INT, _F = (
    ValueType.DATE,
    ValueType.TIME,
    ValueType.NUMBER,
    ValueType.INTEGER,
    ValueType.FLAG,
)
_ACC, _TKT = ValueType.ACCOUNT_REF, ValueType.TICKET_REF


def _fields(**spec: FieldSpec | str) -> Mapping[str, FieldSpec]:
    return MappingProxyType(
        {k: v if isinstance(v, FieldSpec) else FieldSpec(v) for k, v in spec.items()}
    )


ACCOUNT = KindSpec(
    name="ACCOUNT",
    code=10,
    table="accounts",
    rec_id_field="FLDCRDRECID",
    rec_id_prefix="CRD",
    required=(("FLDCRDFULLNAME",),),
    fields=_fields(
        FLDCRDFULLNAME="file_as",
        FLDCRDCOMPANY="company",
        FLDCRDCONTACT="contact",
        FLDCRDLASTNAME="last_name",
        FLDCRDDEAR="dear",
        FLDCRDCARDID2="account_number",
        FLDCRDCARDID3="account_id",
        FLDCRDUSER2="field1",
        FLDCRDUSER3="field2",
        FLDCRDUSER4="field3",
        FLDCRDUSER5="field4",
        FLDCRDEMAIL1=FieldSpec("email1", ValueType.EMAIL),
        FLDCRDEMAIL2=FieldSpec("email2", ValueType.EMAIL),
        FLDCRDADDRESS1="address1",
        FLDCRDADDRESS2="address2",
        FLDCRDADDRESS3="address3",
        FLDCRDCITY="city",
        FLDCRDSTATE="state",
        FLDCRDCOUNTRY="country",
        FLDCRDZIP="zip",
        FLDCRDPHONE1="phone",
        FLDCRDPHONE2="phone2",
        FLDCRDPHONE3="phone3",
        FLDCRDPHONE4="phone4",
        FLDCRDFAX1="fax",
        FLDCRDURL1="url1",
        FLDCRDURL2="url2",
        FLDCRDKIND="kind",
        FLDCRDNOTES="notes",
        FLDCRDACCOUNTSTATUS="status",
        FLDCRDTITLE="title",
        FLDCRDDEPARTMENT="department",
        FLDCRDASSIGNCARDID="manager",
    ),
)

TICKET = KindSpec(
    name="TICKET",
    code=70,
    table="tickets",
    rec_id_field="FLDTKTRECID",
    rec_id_prefix="TKT",
    required=(("FLDTKTCARDID",), ("FLDTKTPROBLEM",)),
    fields=_fields(
        FLDTKTTICKETNO=FieldSpec("number", ValueType.READONLY),
        FLDTKTCARDID=FieldSpec("account", _ACC),
        FLDTKTCONTACTID="contact",
        FLDTKTASSETRECID="asset",
        FLDTKTWORKERID="worker",
        FLDTKTPRIORITY=FieldSpec("priority", _INT),
        FLDTKTPROBLEM="description",
        FLDTKTKIND="kind",
        FLDTKTSOURCE="source",
        FLDTKTSTATUS=FieldSpec("status", _INT),
        FLDTKTDUEDATETIME=FieldSpec("due_at", _D),
        FLDTKTSOLUTION="solution",
        FLDTKTSCHEDLENESTIM="estimated_duration",
        FLDTKTUSER1="field1",
    ),
    not_empty=frozenset({"FLDTKTSTATUS"}),
)

HISTORY_NOTE = KindSpec(
    name="HISTORY-NOTE",
    code=60,
    table="history",
    rec_id_field="FLDHISRECID",
    rec_id_prefix="HIS",
    required=(("FLDHISDESCRIPTION",), ("FLDHISLINKRECID", "FLDHISCARDID")),
    fields=_fields(
        FLDHISNOTEDATETIME=FieldSpec("note_at", _D),
        FLDHISDESCRIPTION="description",
        FLDHISLINKRECID=FieldSpec("link_rec_id", ValueType.TICKET_OR_ACCOUNT_REF),
        FLDHISKIND="kind",
        FLDHISWORKERID="worker",
        FLDHISCARDID=FieldSpec("account", _ACC),
        FLDHISCONTACTID="contact",
        FLDHISUSER1="field1",
    ),
    not_empty=frozenset({"FLDHISNOTEDATETIME"}),
)

CHARGE = KindSpec(
    name="CHARGE",
    code=40,
    table="charges",
    rec_id_field="FLDSLPRECID",
    rec_id_prefix="SLP",
    required=(("FLDSLPCARDID",), ("FLDSLPQUANTITY",)),
    fields=_fields(
        FLDSLPCARDID=FieldSpec("account", _ACC),
        FLDSLPWORKERID="worker",
        FLDSLPITEMID="item",
        FLDSLPTICKETID=FieldSpec("ticket", _TKT),
        FLDSLPSLIPDATE=FieldSpec("slip_date", _D),
        FLDSLPDESC="description",
        FLDSLPQUANTITY=FieldSpec("quantity", _N),
        FLDSLPHOURSAMOUNT=FieldSpec("hours_amount", _N),
        FLDSLPADJUSTAMOUNT=FieldSpec("adjust_amount", _N),
        FLDSLPADJUSTPERCENT=FieldSpec("adjust_percent", _N),
        FLDSLPSTARTTIME=FieldSpec("start_time", _TM),
        FLDSLPENDTIME=FieldSpec("end_time", _TM),
        FLDSLPPRICE=FieldSpec("price", _N),
        FLDSLPBILLKIND=FieldSpec("bill_kind", ValueType.CHOICE, ("B", "N")),
        FLDSLPSTAGE=FieldSpec("stage", ValueType.CHOICE, ("D", "B")),
        FLDSLPUSER1="field1",
    ),
)

APPOINTMENT_OR_TASK = KindSpec(
    name="APPOINTMENT-OR-TASK",
    code=50,
    table="events",
    rec_id_field="FLDEVTRECID",
    rec_id_prefix="EVT",
    required=(("FLDEVTEVENTDATE",), ("FLDEVTFREETEXT",)),
    fields=_fields(
        FLDEVTWRITETOID="event_type",
        FLDEVTWORKERID="worker",
        FLDEVTCARDID=FieldSpec("account", _ACC),
        FLDEVTCONTACTID="contact",
        FLDEVTDONE=FieldSpec("done", _F),
        FLDEVTEVENTDATE=FieldSpec("event_date", _D),
        FLDEVTFREETEXT="description",
        FLDEVTFROMTIME=FieldSpec("from_time", _TM),
        FLDEVTTOTIME=FieldSpec("to_time", _TM),
        FLDEVTLINKRECID=FieldSpec("link_rec_id", _TKT),
    ),
)

ASSET = KindSpec(
    name="ASSET",
    code=90,
    table="assets",
    rec_id_field="FLDASTRECID",
    rec_id_prefix="AST",
    required=(("FLDASTASSETTYPE",), ("FLDASTSTATUS",), ("FLDASTACCRECID",)),
    fields=_fields(
        FLDASTASSETCODE="asset_code",
        FLDASTASSETTYPE="asset_type",
        FLDASTNAME="name",
        FLDASTSTATUS="status",
        FLDASTSERIALNO="serial_no",
        FLDASTACCRECID=FieldSpec("account", _ACC),
        FLDASTCONTACTRECID="contact",
        FLDASTDESC="description",
        FLDASTLOCATION="location",
        FLDASTMANUFACTURER="manufacturer",
        FLDASTMODEL="model",
        FLDASTNOTES="notes",
        FLDASTQUANTITY=FieldSpec("quantity", _N),
        FLDASTVERSION="version",
        FLDASTWARREXPDATE=FieldSpec("warranty_expires", _D),
        FLDASTLICENSECODE="license_code",
        FLDASTLICENSEKEYS="license_keys",
        FLDASTUSER1="field1",
        FLDASTUSER2="field2",
        FLDASTUSER3="field3",
        FLDASTUSER4="field4",
        FLDASTUSER5="field5",
    ),
)

ITEM = KindSpec(
    name="ITEM",
    code=80,
    table="items",
    rec_id_field="FLDITMRECID",
    rec_id_prefix="ITM",
    required=(("FLDITMITEMNO",), ("FLDITMNAME",)),
    fields=_fields(
        FLDITMITEMTYPEGROUP="item_type_group",
        FLDITMITEMNO="item_no",
        FLDITMNAME="name",
        FLDITMUNITISHOUR=FieldSpec("unit_is_hour", _F),
        FLDITMUNITPRICE=FieldSpec("unit_price", _N),
        FLDITMSTANDARDCOST=FieldSpec("standard_cost", _N),
        FLDITMDESC="description",
        FLDITMSUSPENDED=FieldSpec("suspended", _F),
        FLDITMNOTES="notes",
        FLDITMUSER1="field1",
    ),
)

KINDS: Mapping[str, KindSpec] = MappingProxyType(
    {k.name: k for k in (ACCOUNT, CHARGE, APPOINTMENT_OR_TASK, HISTORY_NOTE, TICKET, ITEM, ASSET)}
)
UNSUPPORTED_KINDS: Mapping[str, int] = MappingProxyType(
    {"OPPORTUNITY": 20, "DOCUMENT": 30, "KBARTICLE": 100}
)
KIND_BY_CODE: Mapping[int, str] = MappingProxyType(
    {
        **{k.code: k.name for k in KINDS.values()},
        **{code: name for name, code in UNSUPPORTED_KINDS.items()},
    }
)


@dataclass(frozen=True, slots=True)
class XmlError:
    code: int
    field: str | None
    message: str

    def as_tuple(self) -> tuple[int, str | None, str]:
        return (self.code, self.field, self.message)


@dataclass(frozen=True, slots=True)
class Transaction:
    """A transaction attempt: the envelope, the fields as given, and every problem found."""

    app_name: str | None = None
    response_to: str | None = None
    password: str | None = None
    return_id: str | None = None
    data_kind: str | None = None
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    errors: tuple[XmlError, ...] = ()
    # Other parts of the message that are transactions too, not copies of this one: one
    # transaction per message is applied (the first), the outcome says so.
    others: int = 0
    # SendResponseToEmail as given when it is not one usable address (for the outcome's notes)
    unusable_response_to: str | None = None
    # The zone of a date and time given without one (SMTPGATE_API_TIME_ZONE, set by the
    # pipeline); None: the machine's.
    zone: tzinfo | None = UTC

    @property
    def kind(self) -> KindSpec | None:
        return KINDS.get(self.data_kind) if self.data_kind else None

    @property
    def rec_id(self) -> str | None:
        """The REC ID given for an update; None means add."""
        kind = self.kind
        if kind is None:
            return None
        return self.fields.get(kind.rec_id_field) or None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def actor(self) -> str:
        """xml-api.md 1: ExternalApplicationName is recorded as the creator/updater."""
        return self.app_name or DEFAULT_ACTOR


# ---------------------------------------------------------------------------------------------
# Values

# re.ASCII: \d is 0-9 only ("١٢" is no number here; int() would read it).
_ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})", re.ASCII)
_ISO_DATETIME = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?", re.ASCII
)
_DMY = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?", re.ASCII)
_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", re.ASCII)
# Up to 40 fraction digits: 20 minutes in hours is "0.3333333333333333" from JavaScript, Python
# or .NET (xml-api 3 sets no precision); the bound keeps hostile values short.
_NUMBER = re.compile(r"[+-]?(?:\d{1,18}(?:\.\d{0,40})?|\.\d{1,40})", re.ASCII)
# Whole numbers; "numbers as decimals" (xml-api 3): "10.0" and "1000.00" are whole too.
_INTEGER = re.compile(r"([+-]?\d{1,18})(?:\.0*)?", re.ASCII)

Value = str | int | float | None


def parse_date(text: str, zone: tzinfo | None) -> str | None:
    """Normalize an accepted date (xml-api.md 3) to ISO; None when invalid. A date and time
    is taken in `zone` (None: the machine's) and kept in UTC ("…Z"), as every time the gateway
    records; a date alone is a day, in no zone."""
    try:
        if m := _ISO_DATE.fullmatch(text):
            return date(int(m[1]), int(m[2]), int(m[3])).isoformat()
        if m := _ISO_DATETIME.fullmatch(text):
            y, mo, d, h, mi, s = (int(g or 0) for g in m.groups())
            return _in_utc(datetime(y, mo, d, h, mi, s), zone)
        if m := _DMY.fullmatch(text):
            d, mo, y = int(m[1]), int(m[2]), int(m[3])
            if m[4] is None:
                return date(y, mo, d).isoformat()
            h, mi, s = int(m[4]), int(m[5]), int(m[6] or 0)
            return _in_utc(datetime(y, mo, d, h, mi, s), zone)
    except (ValueError, OverflowError):
        return None
    return None


def _in_utc(wall: datetime, zone: tzinfo | None) -> str:
    """`wall` in `zone`, as UTC. One that cannot be moved there lies at an end of the calendar
    ("9999-12-31 23:59", the usual "no end date", is past the last UTC time west of UTC): it
    is kept at that end, not dropped from the transaction."""
    try:
        local = wall.astimezone() if zone is None else wall.replace(tzinfo=zone)
        # (isoformat, not strftime: glibc writes year 1 as "1", not "0001")
        return local.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
    except (OverflowError, ValueError, OSError):
        return "9999-12-31T23:59:59Z" if wall.year == 9999 else "0001-01-01T00:00:00Z"


def parse_time(text: str, zone: tzinfo | None) -> str | None:
    if m := _TIME.fullmatch(text):
        h, mi, s = int(m[1]), int(m[2]), int(m[3] or 0)
        if h < 24 and mi < 60 and s < 60:
            return f"{h:02d}:{mi:02d}:{s:02d}"
        return None
    return parse_date(text, zone)


def parse_number(text: str) -> int | float | None:
    if not _NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        return None
    return int(value) if "." not in text else float(value)


def convert(spec: FieldSpec, text: str, zone: tzinfo | None = UTC) -> tuple[Value, str | None]:
    """The value to store for `text`, or an error message. Empty text stores NULL; a date and
    time is taken in `zone` (see parse_date)."""
    if spec.type is ValueType.READONLY:
        return None, "read-only field: assigned by smtpgate"
    if text == "":
        return None, None
    match spec.type:
        case ValueType.DATE:
            iso = parse_date(text, zone)
            if iso is None:
                return None, (
                    f"invalid date {text[:40]!r}: use YYYY-MM-DD, YYYY-MM-DD HH:MM[:SS]"
                    " or DD/MM/YYYY [HH:MM]"
                )
            return iso, None
        case ValueType.TIME:
            iso = parse_time(text, zone)
            if iso is None:
                return None, f"invalid time {text[:40]!r}: use HH:MM[:SS] or a date and time"
            return iso, None
        case ValueType.NUMBER:
            number = parse_number(text)
            if number is None:
                return None, f"invalid number {text[:40]!r}: use a decimal such as 10 or 1.5"
            return number, None
        case ValueType.INTEGER:
            whole = _INTEGER.fullmatch(text)
            if whole is None:
                return None, f"invalid whole number {text[:40]!r}"
            return int(whole.group(1)), None
        case ValueType.FLAG:
            flag = text.upper()
            if flag not in ("Y", "N"):
                return None, f"invalid flag {text[:40]!r}: use Y or N"
            return flag, None
        case ValueType.EMAIL:
            # What senders are matched with: "Name <address>" or a list would match no one.
            if not is_account_email(text):
                return None, (
                    f"invalid email value {text[:40]!r}: give one address (jane@example.com)"
                    " or a domain (example.com)"
                )
            return text, None
        case ValueType.CHOICE:
            choice = text.upper()
            if choice not in spec.choices:
                return None, f"invalid value {text[:40]!r}: use one of {', '.join(spec.choices)}"
            return choice, None
        case _:
            return text, None


def column_values(tx: Transaction) -> dict[str, Value]:
    """Column -> value to write for the given fields (REC ID and read-only fields excluded).

    Only meaningful for a transaction of a supported kind; invalid values are skipped (the
    transaction carries their errors and is never applied).
    """
    kind = tx.kind
    if kind is None:
        return {}
    out: dict[str, Value] = {}
    for name, text in tx.fields.items():
        spec = kind.fields.get(name)
        if spec is None or spec.type is ValueType.READONLY:
            continue
        value, problem = convert(spec, text, tx.zone)
        if problem is None:
            out[spec.column] = value
    return out


def references(tx: Transaction) -> list[tuple[str, ValueType, str]]:
    """(field, reference type, id) for every non-empty reference field, for the store to check."""
    kind = tx.kind
    if kind is None:
        return []
    refs = []
    for name, text in tx.fields.items():
        spec = kind.fields.get(name)
        if spec is not None and spec.type in REF_TYPES and text:
            refs.append((name, spec.type, text))
    return refs


# ---------------------------------------------------------------------------------------------
# Finding and parsing

_ROOT = "commitcrmtransaction"
# Is the root element ours? Read without parsing: after the XML declaration, processing
# instructions and comments, and any DTD declarations, the first start tag.
_PROLOG_ITEM = re.compile(r"\s*(?:<\?.*?\?>|<!--.*?-->)", re.DOTALL)
_DECLARATION = re.compile(r"\s*<!(?!--)")  # DOCTYPE, ENTITY, ELEMENT … (comments are skipped)
_ROOT_START = re.compile(r"\s*<(?:[\w.-]+:)?commitcrmtransaction[\s/>]", re.IGNORECASE)
_FIRST_TAG = re.compile(r"<(?![!?/])")  # the first start tag after declarations and comments
_ROOT_END = re.compile(r"</(?:[\w.-]+:)?commitcrmtransaction\s*>", re.IGNORECASE)
# Processing instructions, CDATA sections and comments (skipped whole), or a bare "<!" (a DTD
# declaration) or "<?" (a processing instruction without its end: malformed, for the parser)
_MARKUP_DECLARATION = re.compile(r"<\?.*?\?>|<!\[CDATA\[.*?\]\]>|<!--.*?-->|<[!?]", re.DOTALL)
_DECL_ENCODING = re.compile(
    rb"""^<\?xml[^>]{0,200}?encoding\s*=\s*["']([A-Za-z0-9._:-]{1,40})["']"""
)
_XML_WS = b" \t\r\n"
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_ADDRESS = re.compile(r"[^@\s<>()\[\],;:\"\\]{1,64}@[^@\s<>()\[\],;:\"\\]{1,253}")
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _parser() -> etree.XMLPullParser:
    # xml-api.md 4: no DTD, no entity resolution, no network, no huge-tree mode. The document is
    # handed over re-encoded as UTF-8, so the parser is told so (any declaration is ignored).
    return etree.XMLPullParser(
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        remove_comments=True,
        encoding="utf-8",
    )


def _split_bom(raw: bytes) -> tuple[str | None, bytes]:
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            return encoding, raw[len(bom) :]
    # UTF-16 without a BOM still shows "<" next to a NUL, after any white space (xml-api 1
    # allows it; .NET's System.Net.Mail sends UTF-16LE without a BOM).
    if _UTF16LE_START.match(raw):
        return "utf-16-le", raw
    if _UTF16BE_START.match(raw):
        return "utf-16-be", raw
    return None, raw


_UTF16LE_START = re.compile(rb"(?:[ \t\r\n]\x00){0,64}<\x00")
_UTF16BE_START = re.compile(rb"(?:\x00[ \t\r\n]){0,64}\x00<")


# Python codec names of the charsets that write non-ASCII text in ASCII bytes.
_SEVEN_BIT_CODECS = ("iso2022_", "utf-7", "hz")


def _decode(raw: bytes, charset: str | None = None) -> str:
    """The document as text; raises _Refused(150001) when its encoding is unknown or wrong.

    A byte order mark first; then bytes that are valid UTF-8; then `charset` (the codec of a
    text part's MIME charset: RFC 7303 3 puts it before the declaration); then the XML
    declaration. A mail client re-encodes the text of a body part and names the new charset
    in its header, leaving the declaration as it was: a transaction declaring ISO-8859-1,
    sent as UTF-8, was stored garbled ("CafÃ©") with Status 1. UTF-8 goes before the label
    because a single-byte label decodes UTF-8 bytes without an error, wrongly. ASCII bytes
    follow the declaration unless the label is a 7-bit charset (ISO-2022-*, UTF-7, HZ). (A
    charset its bytes do not fit, or a UTF-16/32 label on 8-bit text, is passed over.)"""
    encoding, body = _split_bom(raw)
    if encoding is not None:
        try:
            return body.decode(encoding)
        except UnicodeDecodeError as exc:
            raise _Refused(ERR_MALFORMED, f"not valid {encoding}") from exc
    body = body.lstrip(_XML_WS)
    if not body.isascii():
        # Non-ASCII bytes that are valid UTF-8 are UTF-8 whatever the labels say: a label of a
        # single-byte charset would decode them too, wrongly ("MÃ¼ller"), and real text in
        # such a charset is almost never valid UTF-8.
        with contextlib.suppress(UnicodeDecodeError):
            return body.decode("utf-8")
        if charset is not None and not charset.startswith(("utf-16", "utf-32")):
            with contextlib.suppress(UnicodeDecodeError, LookupError):
                return body.decode(charset)
    elif charset is not None and charset.startswith(_SEVEN_BIT_CODECS):
        # ISO-2022-JP (Japanese mail's usual charset) and UTF-7 write any text in ASCII bytes:
        # only the label says so. Read as ASCII, the transaction was refused (the ESC bytes) or
        # stored undecoded ("+MNcw6jDz…").
        with contextlib.suppress(UnicodeDecodeError, LookupError):
            return body.decode(charset)
    m = _DECL_ENCODING.match(body)
    if m is not None:
        declared = m[1].decode("ascii").lower()
        try:
            info = codecs.lookup(declared)
        except LookupError as exc:
            raise _Refused(ERR_MALFORMED, f"unknown encoding {declared!r}") from exc
        # A declaration read as ASCII cannot be honest about UTF-16/32: decode as UTF-8.
        name = "utf-8" if info.name.startswith(("utf-16", "utf-32")) else info.name
        try:
            return body.decode(name)
        except (UnicodeDecodeError, LookupError) as exc:
            raise _Refused(ERR_MALFORMED, f"not valid {declared}") from exc
    # No declaration: UTF-8, else a legacy charset. Be lenient.
    for codec in ("utf-8", "cp1252"):
        with contextlib.suppress(UnicodeDecodeError, LookupError):
            return body.decode(codec)
    return body.decode("latin-1")


def _declares(text: str) -> bool:
    """Whether the document holds "<!" outside a comment, a CDATA section or a processing
    instruction: a DOCTYPE or ENTITY declaration, refused before parsing wherever it stands
    (xml-api 4: 150012). Inside CDATA or a comment, "<!DOCTYPE html>" is text. Linear: a
    section, comment or instruction without its end is a bare "<!" or "<?", and the search
    stops there (a "<![CDATA[" inside an instruction cannot hide a DOCTYPE after it)."""
    for m in _MARKUP_DECLARATION.finditer(text):
        if len(m.group()) == 2:
            return m.group() == "<!"
    return False


def _ours(head: str) -> bool:
    """Whether a document starting with `head` has CommitCRMTransaction as its root element
    (xml-api 1: only then is a message an XML transaction). Any other XML — a plist or a log
    attached as .xml, an HTML body, a reply quoting a transaction — is ordinary mail."""
    pos = 0
    while item := _PROLOG_ITEM.match(head, pos):
        pos = item.end()
    if _DECLARATION.match(head, pos):
        # A DTD can be long and hostile, and is not read: a document whose first start tag
        # after it is ours is a transaction, refused for its DTD (150012). (A "<" inside the
        # DTD may be taken for that tag: then it is ordinary mail, and is not parsed either.)
        first = _FIRST_TAG.search(head, pos)
        return first is not None and _ROOT_START.match(head, first.start()) is not None
    return _ROOT_START.match(head, pos) is not None


def _head_text(raw: bytes) -> str:
    encoding, body = _split_bom(raw[: _HEAD * 4])
    try:
        text = body.decode(encoding or "utf-8", errors="replace")
    except LookupError:  # pragma: no cover - encodings come from the table above
        text = ""
    return text.lstrip()[:_HEAD]


def _names_ours(raw: bytes) -> bool:
    """A cheap look: does this candidate start a CommitCRMTransaction document?"""
    return _ours(_head_text(raw))


def _parse(text: str) -> etree._Element:
    """Parse with depth and size limits; raises _Refused."""
    data = text.encode("utf-8")
    parser = _parser()
    depth = 0
    elements = 0
    try:
        for offset in range(0, len(data), _CHUNK):
            parser.feed(data[offset : offset + _CHUNK])
            for event, _el in parser.read_events():
                if event == "start":
                    depth += 1
                    elements += 1
                    if depth > MAX_DEPTH:
                        raise _Refused(ERR_UNSAFE, f"nested deeper than {MAX_DEPTH} levels")
                    if elements > MAX_ELEMENTS:
                        raise _Refused(ERR_UNSAFE, f"more than {MAX_ELEMENTS} elements")
                else:
                    depth -= 1
        root = parser.close()
    except etree.XMLSyntaxError as exc:
        message = str(exc)
        if "depth" in message.lower():
            raise _Refused(ERR_UNSAFE, f"nested deeper than {MAX_DEPTH} levels") from exc
        raise _Refused(ERR_MALFORMED, f"not well-formed XML: {message[:200]}") from exc
    docinfo: Any = root.getroottree().docinfo  # the stubs lack doctype and say DTDs are never None
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise _Refused(ERR_UNSAFE, "DOCTYPE refused")
    return root


def _local(el: etree._Element) -> str | None:
    tag: object = el.tag  # comments/PIs/entities carry a non-str tag (the stubs say str)
    if not isinstance(tag, str):
        return None
    return etree.QName(tag).localname


def _text(el: etree._Element) -> str:
    return "".join(str(t) for t in el.itertext()).strip()


def _clean(value: str | None) -> str | None:
    return _XML_INVALID.sub("", value) if value else None


# An address is at most 254 characters (RFC 5321 4.5.3.1.3); with a display name, one line.
_MAX_ADDRESS_TEXT = 998


def _address(value: str | None) -> str | None:
    # Exactly one address, no control characters: the response must go nowhere else.
    if not value or len(value) > _MAX_ADDRESS_TEXT or any(c < " " or c == "\x7f" for c in value):
        return None
    try:
        parsed = getaddresses([value])
    except RecursionError:  # the email package recurses once per nested "(" of a comment
        return None
    if len(parsed) != 1:
        return None
    local, at, domain = parsed[0][1].strip().rpartition("@")
    # The domain is case-insensitive; the local part may not be (RFC 5321 2.4): kept as given.
    addr = f"{local}{at}{domain.lower()}"
    return addr if len(addr) <= 254 and _ADDRESS.fullmatch(addr) else None


def _kind_name(given: str | None) -> str | None:
    if given is None:
        return None
    name = given.strip().upper().replace("_", "-")
    if name.isascii() and name.isdigit() and int(name) in KIND_BY_CODE:  # not "²"
        return KIND_BY_CODE[int(name)]
    return name


def _validate(kind: KindSpec, fields: Mapping[str, str], adding: bool) -> list[XmlError]:
    errors: list[XmlError] = []
    for name, text in fields.items():
        if name == kind.rec_id_field:
            if not text:
                errors.append(
                    XmlError(ERR_INVALID, name, "empty REC ID: leave the field out to add")
                )
            continue
        spec = kind.fields[name]
        _, problem = convert(spec, text)
        if problem is not None:
            errors.append(XmlError(ERR_INVALID, name, problem))
        elif not text and not adding and not kind.may_empty(name):
            errors.append(XmlError(ERR_INVALID, name, "this field cannot be emptied"))
    if not adding:
        # A group of several (HISTORY-NOTE: its ticket or its account): a member is emptied
        # only when another is given, so an update cannot leave the record linked to nothing.
        for group in kind.required:
            emptied = [name for name in group if name in fields and not fields[name]]
            if len(group) > 1 and emptied and not any(fields.get(name) for name in group):
                errors.extend(
                    XmlError(ERR_INVALID, name, f"required: one of {', '.join(group)}")
                    for name in emptied
                )
    if adding:
        for group in kind.required:
            if not any(fields.get(name) for name in group):
                errors.append(
                    XmlError(
                        ERR_INVALID,
                        group[0],
                        "required field missing"
                        if len(group) == 1
                        else f"required: one of {', '.join(group)}",
                    )
                )
    return errors


def _transaction(root: etree._Element) -> Transaction:
    envelope: dict[str, str] = {}
    record_data: list[etree._Element] = []
    for child in root:
        name = _local(child)
        if name is None:
            continue
        key = name.lower()
        if key == "recorddata":
            record_data.append(child)
        elif key not in envelope:
            envelope[key] = _text(child)  # unknown envelope elements are ignored
    app_name = _clean(envelope.get("externalapplicationname"))
    kind_name = _kind_name(envelope.get("datakind") or None)

    errors: list[XmlError] = []
    fields: dict[str, str] = {}
    duplicates: list[str] = []
    for rd in record_data[:1]:
        for el in rd:
            name = _local(el)
            if name is None:
                continue
            name = name.upper()
            if name in fields:
                duplicates.append(name)
                continue
            fields[name] = _text(el)
    frozen = MappingProxyType(fields)

    if kind_name is None:
        errors.append(XmlError(ERR_KIND, None, "DataKind missing"))
    elif kind_name in UNSUPPORTED_KINDS:
        errors.append(XmlError(ERR_KIND, None, f"data kind {kind_name} is not supported"))
    elif kind_name not in KINDS:
        errors.append(XmlError(ERR_KIND, None, f"unknown data kind {kind_name[:40]!r}"))
    # A required element missing or repeated (150010): the document was read, so the sender
    # is answered, as for a missing field (150001 is for documents that could not be read).
    if len(record_data) > 1:
        errors.append(XmlError(ERR_INVALID, None, "more than one RecordData element"))
    elif not record_data:
        errors.append(XmlError(ERR_INVALID, None, "RecordData missing"))
    kind = KINDS.get(kind_name) if kind_name else None
    if kind is not None:
        unknown = [n for n in fields if not kind.known(n)]
        errors.extend(
            XmlError(ERR_UNKNOWN_FIELD, n[:100], f"unknown field for {kind.name}") for n in unknown
        )
        errors.extend(
            XmlError(ERR_INVALID, n, "field given more than once")
            for n in dict.fromkeys(duplicates)
        )
        known = {n: v for n, v in fields.items() if kind.known(n)}
        errors.extend(_validate(kind, known, adding=kind.rec_id_field not in fields))
    given = envelope.get("sendresponsetoemail")
    response_to = _address(given)
    return Transaction(
        app_name=app_name,
        response_to=response_to,
        unusable_response_to=given[:200] if given and given.strip() and not response_to else None,
        password=envelope.get("password") or None,
        return_id=_clean(envelope.get("returntransactionid")),
        data_kind=_clean(kind_name),
        fields=frozen,
        errors=tuple(errors),
    )


def _refused(code: int, message: str) -> Transaction:
    return Transaction(errors=(XmlError(code, None, message),))


def _examine(
    raw: bytes, max_bytes: int, charset: str | None = None
) -> tuple[Transaction, bool] | None:
    """(transaction, parsed) when `raw` is a transaction attempt, else None."""
    if len(raw) > max_bytes:
        if _names_ours(raw):
            return _refused(ERR_UNSAFE, f"larger than the {max_bytes}-byte limit"), False
        return None
    try:
        text = _decode(raw, charset)
    except _Refused as exc:
        return (_refused(exc.code, exc.message), False) if _names_ours(raw) else None
    text = text.lstrip("\ufeff \t\r\n")
    if not _ours(text):  # linear: anchored, or one search after a DOCTYPE
        return None
    # Mail systems append footers ("Sent from my phone", disclaimers) after the document.
    ends = list(_ROOT_END.finditer(text))
    if ends:
        text = text[: ends[-1].end()]
    if _declares(text):
        return _refused(ERR_UNSAFE, "DOCTYPE/entity declarations refused"), False
    try:
        root = _parse(text)
    except _Refused as exc:
        return _refused(exc.code, exc.message), False
    if (_local(root) or "").lower() != _ROOT:  # a DOCTYPE that names ours over another root
        return _refused(ERR_MALFORMED, "root element is not CommitCRMTransaction"), False
    return _transaction(root), True


def find_transaction(
    candidates: Sequence[bytes],
    *,
    max_bytes: int = MAX_BYTES,
    charsets: Sequence[str | None] = (),
) -> Transaction | None:
    """The transaction in the first candidate holding one, or None for ordinary mail.

    Candidates are the text/plain body, XML parts and .xml attachments, in that order (with
    `charsets`, the codecs of their MIME charsets: see `_decode`). A well-formed
    CommitCRMTransaction wins over an earlier attempt that was refused, so a body mangled by a
    mail client does not hide the same transaction attached as a file.
    """
    refused: Transaction | None = None
    labels = (*charsets, *(None,) * len(candidates))[: len(candidates)]  # one a candidate
    for i, raw in enumerate(candidates):
        found = _read(raw, max_bytes, labels[i])
        if found is None:
            continue
        tx, parsed = found
        if parsed:
            applied = bytes(raw).strip()
            others = sum(
                1
                for later, label in zip(candidates[i + 1 :], labels[i + 1 :], strict=True)
                if bytes(later).strip() != applied
                and _names_ours(bytes(later))
                # a body a mail client re-wrapped or re-encoded and the same document attached
                # are one transaction, not two: compared as read
                and _read(later, max_bytes, label) != (tx, True)
            )
            return replace(tx, others=others) if others else tx
        if refused is None:
            refused = tx
    return refused


def _read(raw: bytes, max_bytes: int, charset: str | None) -> tuple[Transaction, bool] | None:
    """`_examine`, never raising (belt and braces): what cannot be read is refused (150001)."""
    try:
        return _examine(bytes(raw), max_bytes, charset)
    except (ValueError, LookupError, etree.LxmlError) as exc:
        return _refused(ERR_MALFORMED, f"unreadable XML: {type(exc).__name__}"), False


# ---------------------------------------------------------------------------------------------
# Password and response


def password_ok(tx: Transaction, configured: str | None) -> bool:
    """xml-api.md 1: required and compared in constant time when a password is configured."""
    if not configured:
        return True
    if tx.password is None:
        return False
    return hmac.compare_digest(tx.password.encode("utf-8"), configured.encode("utf-8"))


def response_xml(
    tx: Transaction, *, status: int, rec_id: str | None, errors: Sequence[XmlError]
) -> bytes:
    """The CommitCRMTransactionResponse of xml-api.md section 2, UTF-8 with a declaration."""
    root = etree.Element("CommitCRMTransactionResponse")
    for tag, value in (
        ("ExternalApplicationName", tx.app_name),
        ("ReturnTransactionID", tx.return_id),
        ("DataKind", tx.data_kind),
        ("Status", str(status)),
        ("RecID", rec_id if status == OK else None),
    ):
        etree.SubElement(root, tag).text = _clean(value)
    errors_el = etree.SubElement(root, "Errors")
    for error in errors:
        el = etree.SubElement(errors_el, "Error", code=str(error.code))
        if error.field:
            el.set("field", _clean(error.field) or "")
        el.text = _clean(error.message)
    body = etree.tostring(root, encoding="utf-8", xml_declaration=False, pretty_print=True)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + body
