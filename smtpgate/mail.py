"""Raw message bytes -> ParsedMessage: headers, addresses, body text, attachments, auto-reply signs.

Pure and total: no I/O, bounded work on hostile input, and `parse_message` never raises.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import functools
import hashlib
import html
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.feedparser import BytesFeedParser
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from typing import Any

from smtpgate.model import has_bare_line_end, has_long_line, nfc

__all__ = [
    "DEFAULT_QUOTE_PATTERNS",
    "Attachment",
    "ParsedMessage",
    "address_domain",
    "parse_message",
    "strip_quotes",
]

# --- limits: hostile mail must cost bounded work --------------------------------------------------

_MAX_RAW_BYTES = 64 * 1024 * 1024  # the front caps messages far lower; parse at most this much
_MAX_BUILT_PARTS = 5000  # parts the stdlib parser may build before we give up on the structure
_MAX_PARTS = 1000  # parts we look at
_MAX_DEPTH = 50  # multipart / message nesting we follow
_MAX_TEXT_CHARS = 1_000_000
_MAX_HTML_CHARS = 2_000_000  # HTML source reduced to text (a Python loop per tag: keep it short)
_MIN_SKIPPED_DATA_URI = 1000  # a data: URI payload this long is left out of HTML past the cut
# XML candidates are cut here: a transaction can be at most SMTPGATE_API_MAX_XML_BYTES, which
# is capped at this.
_MAX_XML_BYTES = 4 * 1024 * 1024
_MAX_SUBJECT_CHARS = 16_384
_MAX_ADDRESS_HEADER_CHARS = 8_192
_MAX_PARAM_HEADER_CHARS = 65_536
_MAX_MESSAGE_IDS = 1000
_MAX_DEFECTS = 50
_MAX_QUOTE_LINE_CHARS = 1000  # longer lines are never quote headers; skip the regexes on them


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str | None
    content_type: str  # lower-case, e.g. "application/pdf"
    size: int  # decoded payload size in bytes (for an enclosed message/*: its approximate size)
    # 64 bits of the decoded payload's SHA-256 ("" for an enclosed message): what tells two
    # scans a copier sends under one fixed Message-ID apart (pipeline.fingerprint)
    digest: str = field(default="", compare=False)
    # An image the HTML body shows (a Content-ID, not disposed as an attachment: a signature's
    # logo), not something sent
    inline: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    subject: str
    from_address: str
    from_name: str
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    auto_submitted: str | None
    precedence: str | None
    list_id: bool
    list_unsubscribe: bool  # bulk mail (RFC 2369/8058), often without Precedence or List-Id
    auto_response_suppress: bool
    loop_header: str | None
    is_auto_reply: bool
    is_delivery_report: bool
    text: str
    html_only: bool
    attachments: tuple[Attachment, ...]
    xml_candidates: tuple[bytes, ...]
    defects: tuple[str, ...]
    # The codec of each XML candidate's MIME charset (text parts), or None: xml-api reads a
    # document that is not UTF-8 with it before its own declaration (xmlapi._decode).
    xml_charsets: tuple[str | None, ...] = ()
    # An RFC 3464 delivery report or RFC 8098 read receipt by its MIME structure: surely an
    # answer to mail (is_delivery_report and is_auto_reply also guess from words and senders).
    report_structure: bool = False
    # The X-Smtpgate-Loop values in enclosed messages sent encoded (a Domino bounce of our
    # mail) and in a report's encoded returned headers, at most 16: hidden from a search of
    # the raw bytes.
    enclosed_loop_markers: frozenset[str] = frozenset()
    # Whether such an enclosure also holds an X-Smtpgate-Action field: one of our forwards.
    encloses_forward: bool = False
    # A line over RFC 5321's 998 octets (the listener takes up to 1 MiB): a forward breaks it
    # (outbound.break_long_lines). Told here, where a big message is read in a thread.
    long_lines: bool = False


# The words of an Outlook header block, in the languages MSP customers write in: the sender's
# field, the field after it that dates the message ("Sent:"; Outlook for Mac writes "Date:"),
# and the subject's, which every real block holds.
_FROM_WORDS = (
    "From|Von|De|Da|Van|Från|Fra|Od|Lähettäjä|От|Від|Kimden|Feladó|De la|Από|מאת|من|"
    "发件人|寄件者|差出人|送信者|보낸 사람"
)
_SENT_WORDS = (
    "Sent|Gesendet|Envoyé|Enviado el|Enviado em|Enviada em|Enviado|Inviato|Verzonden|Skickat|"
    "Sendt|Wysłano|Odesláno|Odoslané|Poslano|Poslato|Lähetetty|Отправлено|Надіслано|Изпратено|"
    "Gönderildi|Elküldve|Trimis|Στάλθηκε|נשלח|تم الإرسال|发送时间|寄件日期|送信日時|보낸 날짜"
)
_DATE_WORDS = "Date|Datum|Fecha|Data|Дата|Tarih|Dátum|Ημερομηνία|תאריך|التاريخ|日期|日付|날짜"
_SUBJECT_WORDS = (
    "Subject|Betreff|Objet|Asunto|Oggetto|Assunto|Onderwerp|Ämne|Emne|Temat|Předmět|Predmet|"
    "Zadeva|Aihe|Тема|Konu|Tárgy|Subiect|Θέμα|נושא|الموضوع|主题|主旨|件名|제목"
)
# An attribution holds a time, a year or an address ("On Thu, 26 Nov 2026 at 13:05, Support
# <a@b> wrote:"); "On SRV01 the agent wrote:" or "При входе в 1С пишет:" is the customer's.
_DATED = r"(?=.*(?:\d:\d\d|\b(?:19|20)\d\d\b|@))"
# Regex sources for the lines that start a quoted reply (spec 2.3). Config compiles them with
# re.IGNORECASE and matches each against one line with .search; lines starting with '>' are
# dropped by strip_quotes itself. Repetitions are bounded so that a hostile line stays cheap.
DEFAULT_QUOTE_PATTERNS: tuple[str, ...] = (
    # Outlook plain text: "-----Original Message-----" and its translations (Foxmail's
    # "------------------ 原始邮件 ------------------" too); Zimbra's "----- Ursprüngliche Mail
    # -----" / "----- Mail original -----" and Telekom webmail's "-----Original-Nachricht-----"
    r"^\s*-{2,}\s*(?:Original Message|Ursprüngliche Nachricht|Message d'origine|"
    r"Messaggio originale|Mensaje original|Mensagem original|Oorspronkelijk bericht|"
    r"Originalmeddelande|Original meddelelse|Opprinnelig melding|Alkuperäinen viesti|"
    r"Wiadomość oryginalna|Původní zpráva|Исходное сообщение|原始邮件|原始郵件|"
    r"元のメッセージ|원본 메시지|Ursprüngliche Mail|Mail original|Original-Nachricht)\s*-{2,}\s*$",
    # Outlook HTML converted to text: the rule above the header block
    r"^\s*_{10,}\s*$",
    # Outlook header block: "From: Name <a@b>", "From: Name [mailto:a@b]", "From: Name" (and
    # translations); strip_quotes takes it for one only with the block's other fields after it.
    rf"^\s*(?:{_FROM_WORDS})\s?:\s*\S",
    # GMX / WEB.DE / mail.com: the date first ("Gesendet: … / Von: … / An: … / Betreff: …");
    # strip_quotes takes it for a header block only with the sender and subject fields after it.
    rf"^\s*(?:{_SENT_WORDS})\s?:\s*\S",
    # Gmail, Apple Mail, Thunderbird: "On Thu, 26 Nov 2026 at 13:05, Support <a@b> wrote:"
    rf"^{_DATED}\s*On\s.{{1,300}}\swrote\s?:\s*$",
    # Zoho: "---- On Thu, 26 Nov 2026 13:05:00 +0100 Support <a@b> wrote ----"
    rf"^{_DATED}\s*-{{2,}}\s*On\s.{{1,300}}\swrote\s*-{{2,}}\s*$",
    rf"^{_DATED}\s*Le\s.{{1,300}}\sa\sécrit\s?:\s*$",
    rf"^{_DATED}\s*Am\s.{{1,300}}\sschrieb\s.{{0,300}}:\s*$",
    rf"^{_DATED}\s*El\s.{{1,300}}\sescribió\s?:\s*$",
    rf"^{_DATED}\s*Il\s.{{1,300}}\sha\sscritto\s?:\s*$",
    rf"^{_DATED}\s*Em\s.{{1,300}}\sescreveu\s?:\s*$",
    rf"^{_DATED}\s*Op\s.{{1,300}}\sschreef\s.{{0,300}}:\s*$",
    rf"^{_DATED}\s*(?:Den|På)\s.{{1,300}}\sskrev\s.{{0,300}}:\s*$",
    # "05.01.2026 10:02, Support пишет:" and other languages' verb last
    rf"^{_DATED}.{{1,300}}\s(?:пишет|написал|написала|написав|kirjoitti|napisał\(a\)|napisał|"
    r"napisała|napsal|napísal|írta|έγραψε|yazdı|כתב|כתבה|كتب)\s?:\s*$",
    # Gmail in Japanese, Chinese, Korean: "2026年1月5日(月) 10:02 Support <a@b>:", "… <a@b> 于
    # 2026年1月5日周一 10:02写道：", "… <a@b>님이 작성:"
    rf"^{_DATED}.{{1,300}}<[^<>\s]+@[^<>\s]+>\s?:\s*$",
    rf"^{_DATED}.{{1,300}}(?:写道|寫道)\s?[:：]\s*$",
    rf"^{_DATED}.{{1,300}}>\s?님이 작성\s?:\s*$",
)
_FROM_FIELD = re.compile(rf"^\s*(?:{_FROM_WORDS})\s?:", re.IGNORECASE)
# "Name <a@b>", "Name [mailto:a@b]", or the address alone (Outlook for Mac, Apple Mail)
_FROM_WITH_ADDRESS = re.compile(
    r"<[^<>\s]+@[^<>\s]+>|\[mailto:[^\]\s]+\]|:\s*[^\s<>@:]+@[^\s<>@]+\s*$"
)
_SENT_FIELD = re.compile(rf"^\s*(?:{_SENT_WORDS})\s?:", re.IGNORECASE)
_DATE_FIELD = re.compile(rf"^\s*(?:{_SENT_WORDS}|{_DATE_WORDS})\s?:", re.IGNORECASE)
_SUBJECT_FIELD = re.compile(rf"^\s*(?:{_SUBJECT_WORDS})\s?:", re.IGNORECASE)


# An X-Smtpgate-Loop field anywhere in decoded bytes (outbound.LOOP_HEADER), and how many
# distinct values a message's enclosures are read for.
_LOOP_VALUE = re.compile(
    rb"^x-smtpgate-loop[ \t]*:[ \t]*<?([^\s<>]{1,320})>?", re.IGNORECASE | re.MULTILINE
)
_MAX_LOOP_VALUES = 16
_ACTION_FIELD = re.compile(rb"^x-smtpgate-action[ \t]*:", re.IGNORECASE | re.MULTILINE)


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse raw message bytes. Never raises: what cannot be read is listed in `defects`."""
    try:
        return _Parser(raw).run()
    except Exception as exc:  # last line of defence: parsing must be total
        defects = (f"unparseable message ({type(exc).__name__})",)
    try:
        return _empty_message(defects, long_lines=has_long_line(raw))
    except Exception:  # not even bytes
        return _empty_message(defects)


def strip_quotes(text: str, patterns: Sequence[re.Pattern[str]]) -> str:
    """Cut a reply at its quote header and drop '>' lines (spec 2.3: file only the new text).

    The first line matching any pattern (searched line by line) and everything after it go,
    unless '>' lines follow it: then only the header goes, and the lines between the quoted
    ones stay (answers written inline, below "On … wrote:"). Lines starting with '>' go;
    trailing whitespace goes. What is left may be nothing (a reply that brings only an
    attachment): the caller knows whether the whole text is the better note then.
    """
    kept: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        header = (
            1
            if len(line) <= _MAX_QUOTE_LINE_CHARS and any(p.search(line) for p in patterns)
            else _wrapped_quote_header(lines, i, patterns)
        )
        if (
            header
            and (_FROM_FIELD.match(line) or _SENT_FIELD.match(line))
            and not _header_block(lines, i, header)
        ):
            header = 0  # "From: …" or "Sent: …" without the block's other fields: the customer's
        if header:
            # the next line with text (no slice of the rest: headers can follow each other)
            after = next((lines[j] for j in range(i + header, len(lines)) if lines[j].strip()), "")
            if not after.lstrip().startswith(">"):
                break  # the original follows unquoted (Outlook): all of it goes
            i += header
            continue
        if not line.lstrip().startswith(">"):
            kept.append(line.rstrip())
        i += 1
    return "\n".join(kept).rstrip()


def _header_block(lines: list[str], i: int, header: int) -> bool:
    """Whether the "From:" line i starts an Outlook header block: its date field among the next
    three lines ("Sent:", or "Date:" after a sender with an address), and without an address
    its subject field among the next six too ("From: Room 2.14 / To: … / Date: …" is a desk
    move, "From: Billing <…> / Subject: …" a header the customer pasted). A "Sent:" line i
    starts one (GMX, WEB.DE and mail.com write the date first) with the sender's field right
    after it and the subject's among the next six ("Sent: Monday by DHL / From: our
    warehouse" is the customer's)."""
    following = [line for line in lines[i + header : i + header + 8] if line.strip()]
    if _SENT_FIELD.match(lines[i]):
        return any(_FROM_FIELD.match(line) for line in following[:1]) and any(
            _SUBJECT_FIELD.match(line) for line in following[:6]
        )
    if _FROM_WITH_ADDRESS.search(lines[i]):
        return any(_DATE_FIELD.match(line) for line in following[:3])
    return any(_SENT_FIELD.match(line) for line in following[:3]) and any(
        _SUBJECT_FIELD.match(line) for line in following[:6]
    )


def _wrapped_quote_header(lines: list[str], i: int, patterns: Sequence[re.Pattern[str]]) -> int:
    """Gmail and others hard-wrap a long attribution ("On …, Name <a@b>" / "wrote:"): line i
    starts a quote header when it matches only joined with the next one or two lines. The
    header's number of lines, or 0."""
    if lines[i].lstrip().startswith(">") or not lines[i].strip():
        return 0
    joined = lines[i].rstrip()
    for n, following in enumerate(lines[i + 1 : i + 3], start=2):
        if not following.strip() or following.lstrip().startswith(">"):
            return 0
        if any(p.search(following) for p in patterns):
            return 0  # that line is the header on its own: keep line i
        joined = f"{joined} {following.strip()}"
        if len(joined) > _MAX_QUOTE_LINE_CHARS:
            return 0
        if any(p.search(joined) for p in patterns):
            return n
    return 0


def address_domain(address: str) -> str:
    """'a@B.example' -> 'b.example'; '' if the address has no domain."""
    _, at, domain = address.strip().rpartition("@")
    return domain.strip().strip("<>[]").rstrip(".").lower() if at else ""


# --- text helpers ---------------------------------------------------------------------------------

# C0/C1 control characters that are not whitespace: dropped from header values. (Whitespace
# controls such as TAB or U+001C are collapsed to spaces by str.split instead.)
_DROP_CONTROLS = {c: None for c in (*range(0x20), *range(0x7F, 0xA0)) if not chr(c).isspace()}
# Body text keeps TAB and LF (CR is normalised away before); other C0 controls and DEL go.
_TEXT_CONTROLS = {c: None for c in (*range(0x20), 0x7F) if c not in (0x09, 0x0A)}

# Declared charsets that are better read as their common superset (WHATWG encoding standard).
_CHARSET_SUPERSETS = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "x-sjis": "cp932",
    "big5": "cp950",  # Outlook's big5 holds cp950's € and 裏
    "windows-874": "cp874",
    "tis-620": "cp874",
    # Labels mail clients write that Python does not know (WHATWG encoding standard's names).
    "iso-8859-8-i": "iso-8859-8",  # Outlook's Hebrew default: logical order, same bytes
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "windows-31j": "cp932",
    "csshiftjis": "cp932",
    "ms_kanji": "cp932",
    "x-gbk": "gb18030",
    "macintosh": "mac-roman",
    "x-mac-ce": "mac-latin2",
    "x-euc-tw": "cp950",
    "x-x-big5": "cp950",
    "big5-hkscs": "big5hkscs",
    "unicode-1-1-utf-8": "utf-8",
    "x-unicode20utf8": "utf-8",
}
# Codecs that are text encodings to Python but must never interpret mail bytes.
_UNSAFE_CODECS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"}
)


@functools.lru_cache(maxsize=256)
def _codec_for(charset: str | None) -> str | None:
    """A usable Python codec name for a declared MIME charset, or None (cached: mail names a
    few charsets over and over)."""
    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()
    name = name.partition("*")[0]  # RFC 2231 language suffix: utf-8*en
    if not name or len(name) > 40:
        return None
    for label in _charset_labels(name):
        label = _CHARSET_SUPERSETS.get(label, label)
        try:
            codec = codecs.lookup(label)
        except (LookupError, ValueError):
            continue
        if codec.name in _UNSAFE_CODECS:
            return None
        if codec.name == "utf-16":  # without a byte order mark (else _decode_bytes sniffs it)
            return "utf-16-be"  # RFC 2781 4.3 (Python's codec reads little-endian)
        return codec.name
    return None


def _charset_labels(name: str) -> Iterator[str]:
    """The label as written, then as clients mean it: x-gbk is gbk, cp-1252 and windows_1252
    are cp1252."""
    yield name
    yield name.removeprefix("x-")
    yield _CP_LABEL.sub(r"cp\2", name)


_CP_LABEL = re.compile(r"^(cp|windows)[-_ ]?(\d)")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Only from the start of a run of blanks (the lookbehind): tried from each blank of a long run
# that ends in no line end, the match backtracked over the rest of it (quadratic).
_QP_TRAILING_SPACE = re.compile(rb"(?<![ \t])[ \t]+(?=\r?\n|\Z)")
_GUESSED_BOUNDARY = re.compile(r"^--([^\s\"]{1,70})[ \t]*\r?$", re.MULTILINE)
_MAX_PREAMBLE_CHARS = 8192  # where the first delimiter line of a boundary-less multipart is sought
_META_CHARSET = re.compile(rb"<meta[^>]{0,200}?charset\s*=\s*[\"']?\s*([a-z0-9._:-]{1,40})", re.I)
_META_SNIFF_BYTES = 1024
_MAX_RECOVERED = 4
# text/* subtypes that are markup no one reduces to text here (rich text): never the body as
# they are. (HTML subtypes, Apple's text/watch-html and Gmail's text/x-amp-html, are reduced
# as text/html is, and come after it.)
_TEXT_MARKUP = ("enriched", "richtext", "rtf", "xml")
# text/* parts that are data, not something to read as the body.
_TEXT_DATA_TYPES = frozenset(
    {"text/xml", "text/calendar", "text/rfc822-headers", "text/csv", "text/x-vcard", "text/vcard"}
)
_BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),  # before UTF-16's, which it starts with
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


def _decode_bytes(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode with the declared charset, then UTF-8, cp1252, Latin-1. Returns (text, charset_ok).

    charset_ok is False when a declared charset was unknown or did not fit the bytes. A byte
    order mark wins over the label (as in mail readers and the WHATWG encoding standard).
    """
    for mark, sniffed in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            return data[len(mark) :].decode(sniffed, "replace"), True
    codec = _codec_for(charset)
    if codec is not None:
        try:
            text = data.decode(codec)
            if codec == "utf-7" and _SURROGATE.search(text):
                # UTF-7 decodes "+2D0-" to a lone surrogate, which no database or mail can
                # hold: the message failed on every attempt until it went dead.
                return _SURROGATE.sub("\ufffd", text), False
            return text, True
        except Exception:  # UnicodeError, or any oddity of an exotic codec
            if codec == "cp1252":  # declared Latin-1 (mapped to cp1252) that uses 0x81 & co.
                return data.decode("latin-1"), True
            if codec.startswith("iso2022_jp"):
                # 8-bit: mislabelled UTF-8, or Shift_JIS or EUC-JP (old CGI mailers, devices)
                for guess in ("utf-8", "cp932", "euc_jp") if not data.isascii() else ():
                    with contextlib.suppress(UnicodeDecodeError):
                        return data.decode(guess), False
                return _decode_outlook_jis(data)
            if codec in _EAST_ASIAN_CODECS:
                # The rest in the declared charset, a bad byte replaced: guessed as UTF-8 (7-bit
                # bytes "fit") or cp1252, the whole text was garbled.
                with contextlib.suppress(UnicodeDecodeError):
                    return data.decode("utf-8"), False  # mislabelled UTF-8, when it is that
                return data.decode(codec, "replace"), False
    declared_ok = not charset
    for fallback in ("utf-8", "cp1252"):
        try:
            return data.decode(fallback), declared_ok
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), declared_ok


_EAST_ASIAN_CODECS = frozenset(
    {"cp932", "euc_jp", "shift_jis", "gb18030", "gbk", "gb2312", "hz", "cp950", "big5",
     "big5hkscs", "cp949", "euc_kr", "johab", "iso2022_kr"}
)  # fmt: skip
# The modes of ISO-2022-JP; JIS X 0212 (ESC $ ( D), which cp932 has not, reads as U+FFFD.
_JIS_MODE = re.compile(rb"\x1b(\$[@B]|\$\(D|\([BJI])")


def _decode_outlook_jis(data: bytes) -> tuple[str, bool]:
    """ISO-2022-JP as Outlook and Windows write it (CP50220): JIS X 0208 with Microsoft's
    extensions (①, ㈱, ～), which Python's iso2022_jp refuses. Read as browsers read it
    (WHATWG): each two-byte JIS character through its Shift_JIS code in cp932. False with
    the text when something did not fit (a stray byte, JIS X 0212, an unknown escape)."""
    parts = _JIS_MODE.split(data)  # text, mode, text, mode, …
    out: list[str] = []
    ok = True

    def single(chunk: bytes) -> None:
        nonlocal ok
        ok = ok and b"\x1b" not in chunk
        out.append(chunk.decode("ascii", "replace"))

    single(parts[0])
    for mode, chunk in zip(parts[1::2], parts[2::2], strict=True):
        if mode == b"(I":  # half-width katakana
            out.append(
                bytes(b + 0x80 if 0x21 <= b <= 0x5F else b for b in chunk).decode(
                    "cp932", "replace"
                )
            )
        elif not mode.startswith(b"$"):  # ASCII or JIS-Roman
            single(chunk)
        else:
            # Two bytes a character, up to a line end, which returns to ASCII (WHATWG).
            line, nl, rest = chunk.partition(b"\n")
            if mode == b"$(D":  # JIS X 0212: not in cp932
                ok = False
                out.append("\ufffd" * ((len(line) + 1) // 2))
            else:
                ok = _jis_to_text(line, out) and ok
            if nl:
                out.append("\n")
                single(rest)
    text = "".join(out)
    return text, ok and "\ufffd" not in text


def _jis_to_text(line: bytes, out: list[str]) -> bool:
    """JIS X 0208 bytes (with NEC's and IBM's rows) as text, through Shift_JIS and cp932;
    False when a byte did not fit (it reads as U+FFFD)."""
    sjis = bytearray()
    ok = True
    i = 0
    while i < len(line):
        j1 = line[i]
        j2 = line[i + 1] if i + 1 < len(line) else 0
        if 0x21 <= j1 <= 0x7E and 0x21 <= j2 <= 0x7E:
            s1 = ((j1 + 1) >> 1) + (0x70 if j1 <= 0x5E else 0xB0)
            s2 = j2 + (0x1F if j1 & 1 else 0x7E)
            sjis += bytes((s1, s2 + (1 if j1 & 1 and s2 >= 0x7F else 0)))
            i += 2
        elif j1 == 0x0D:  # a CR before the line end
            sjis.append(j1)
            i += 1
        else:
            out.append(sjis.decode("cp932", "replace") + "\ufffd")
            sjis.clear()
            ok = False
            i += 1
    out.append(sjis.decode("cp932", "replace"))
    return ok


def _to_bytes(value: str) -> bytes:
    """The original bytes of a str produced by the bytes parser (8-bit bytes as surrogates)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def _raw_header_text(value: str) -> str:
    """A raw header value as text: raw 8-bit decoded (UTF-8, else cp1252/Latin-1) and unfolded."""
    if not value.isascii():
        value, _ = _decode_bytes(_to_bytes(value), None)
    if "\n" in value or "\r" in value:
        value = value.replace("\r", "").replace("\n", "")  # RFC 5322 2.2.3 unfolding
    return value


def _collapse(text: str) -> str:
    """Drop control characters, collapse whitespace runs to one space, strip."""
    return " ".join(text.translate(_DROP_CONTROLS).split())


# RFC 2047 encoded word. Its text may hold raw spaces, which RFC 2047 forbids but scripts write
# and mail readers accept; '?' cannot occur inside, which keeps matching linear.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?]*)\?=")
_NOT_BASE64 = bytes(c for c in range(256) if not (chr(c).isalnum() and c < 128) and c not in b"+/")


def _b64decode_lenient(data: bytes) -> tuple[bytes, bool]:
    """Base64 without trust: junk ignored, a dangling char dropped. (bytes, clean). Padding in
    the middle ends a chunk (chunks encoded one by one and put together): each is decoded."""
    core = data.translate(None, b" \t\r\n").rstrip(b"=")
    if b"=" not in core:
        return _b64decode_chunk(core)
    out, ok = [], True
    for chunk in core.split(b"="):
        if chunk:
            decoded, chunk_ok = _b64decode_chunk(chunk)
            out.append(decoded)
            ok = ok and chunk_ok
    return b"".join(out), ok


def _b64decode_chunk(core: bytes) -> tuple[bytes, bool]:
    clean = core.translate(None, _NOT_BASE64)
    ok = len(clean) == len(core)
    if len(clean) % 4 == 1:
        clean, ok = clean[:-1], False
    clean += b"=" * (-len(clean) % 4)
    try:
        return binascii.a2b_base64(clean), ok
    except (binascii.Error, ValueError):
        return b"", False


def _decode_words(text: str) -> tuple[str, bool]:
    """Decode RFC 2047 encoded words anywhere in `text`, in linear time. Returns (text, clean).

    Adjacent encoded words are joined (the whitespace between them is dropped, RFC 2047 6.2) and
    their bytes decoded together when they share a charset, so a multi-byte character split
    across two words survives.
    """
    if "=?" not in text:
        return text, True
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    clean = True
    pos = 0
    after_word = False

    def flush() -> None:
        nonlocal clean, pending_charset
        if pending_charset is not None:
            decoded, ok = _decode_bytes(bytes(pending), pending_charset)
            out.append(decoded)
            clean = clean and ok
            pending.clear()
            pending_charset = None

    for m in _ENCODED_WORD.finditer(text):
        gap = text[pos : m.start()]
        if gap and not (after_word and gap.isspace()):
            flush()
            out.append(gap)
        charset, encoding, payload = m.group(1), m.group(2), m.group(3)
        raw = payload.encode("utf-8", "surrogateescape")
        if encoding in "bB":
            data, ok = _b64decode_lenient(raw)
            clean = clean and ok
        else:
            data = binascii.a2b_qp(raw, header=True)
        if pending_charset is not None and charset.lower() != pending_charset.lower():
            flush()
        pending_charset = charset
        pending += data
        pos = m.end()
        after_word = True
    flush()
    out.append(text[pos:])
    return "".join(out), clean


def _header_words(value: str) -> tuple[str, bool]:
    """Raw header value -> decoded, whitespace-collapsed text. Returns (text, clean)."""
    decoded, clean = _decode_words(_raw_header_text(value))
    return _collapse(decoded), clean


# --- MIME parameters (RFC 2045 5.1, RFC 2231), linear where the stdlib's parser is quadratic -----

_PARAM = re.compile(
    r';\s*(?P<name>[^\s;="]+)\s*(?:=\s*(?:"(?P<q>[^"\\]*(?:\\.[^"\\]*)*)"?|(?P<t>[^;]*)))?',
    re.DOTALL,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _parse_params(value: str) -> tuple[str, dict[str, str]]:
    """'Text/Plain; charset="utf-8"' -> ('text/plain', {'charset': 'utf-8'})."""
    value = value[:_MAX_PARAM_HEADER_CHARS]
    head, sep, rest = value.partition(";")
    params: dict[str, str] = {}
    if not sep:
        return head.strip().lower(), params
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    for m in _PARAM.finditer(";" + rest):
        name = m.group("name").lower()
        quoted = m.group("q")
        if quoted is not None:
            val = _QUOTED_PAIR.sub(r"\1", quoted) if "\\" in quoted else quoted
        else:
            val = (m.group("t") or "").strip()
        if "*" in name:
            # RFC 2231: name*=charset'lang'%xx, name*0=..., name*1*=...
            base, _, index = name.partition("*")
            extended = name.endswith("*")
            index = index.rstrip("*")
            if index == "":
                number = 0
            elif len(index) <= 3 and index.isascii() and index.isdigit():
                number = int(index)
            else:
                continue
            sections.setdefault(base, {}).setdefault(number, (extended, val))
        else:
            params.setdefault(name, val)
    for base, parts in sections.items():
        params[base] = _join_rfc2231(parts)
    return head.strip().lower(), params


def _join_rfc2231(parts: dict[int, tuple[bool, str]]) -> str:
    charset: str | None = None
    chunks: list[bytes] = []
    numbers = sorted(parts)
    for number in numbers:
        extended, val = parts[number]
        if extended:
            if number == numbers[0] and val.count("'") >= 2:
                charset, _, rest = val.partition("'")
                val = rest.partition("'")[2]
            chunks.append(urllib.parse.unquote_to_bytes(_to_bytes(val)))
        else:
            chunks.append(_to_bytes(val))
    text, _ = _decode_bytes(b"".join(chunks), charset or "utf-8")
    return text


def _boundary_of(content_type: str) -> str | None:
    _, params = _parse_params(content_type)
    boundary = params.get("boundary")
    return None if boundary is None else boundary.rstrip()  # RFC 2046: no trailing space


class _GuardedMessage(Message):
    """A compat32 message whose boundary lookup is linear.

    The stdlib parser asks each multipart for its boundary through email.message._parseparam,
    which is quadratic in the length of a Content-Type holding many ';' and an open quote.
    """

    def get_boundary(self, failobj: Any = None) -> Any:
        for name, value in self.raw_items():
            if name.lower() == "content-type":
                try:
                    boundary = _boundary_of(str(value))
                except Exception:  # an error here would abort the whole parse
                    boundary = None
                return failobj if boundary is None else boundary
        return failobj


class _TooManyParts(Exception):
    pass


# A header field line as the stdlib parser takes one (email.feedparser.headerRE), with a name of
# at least one character; its unix-from and continuation alternatives are checked apart.
_FIELD_NAME = re.compile(r"[\041-\071\073-\176]+:")


def _single_part_tree(raw: bytes) -> Message | None:
    """The tree `_build_tree` makes, for the shape nearly every alert has, without the stdlib's
    line-by-line parser (~25 µs of a ~65 µs parse at 2 KB, more with more lines): CRLF line ends
    only, a header block of well-formed fields up to the first empty line, and no multipart/*
    or message/* Content-Type. Anything else, even where the stdlib parser would only note a
    defect, gives None, and `_build_tree` parses it. tests/test_mail.py holds the two to the
    same result."""
    end = raw.find(b"\r\n\r\n")
    if end <= 0 or has_bare_line_end(raw):
        return None
    # (name, lines of the value): continuation lines are joined at the end, as compat32 does;
    # appended one by one to a growing str, a long folded field took quadratic time.
    folded: list[tuple[str, list[str]]] = []
    for line in raw[:end].decode("ascii", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t"):
            if not folded:
                return None  # the stdlib notes a defect and drops the line
            folded[-1][1].append(line)
            continue
        if line.startswith("From ") or _FIELD_NAME.match(line) is None:
            return None  # a unix-from line, or a line that is no field: the stdlib decides
        name, _, value = line.partition(":")
        folded.append((name, [value.lstrip(" \t")]))
    fields = [(name, "\r\n".join(lines)) for name, lines in folded]
    for name, value in fields:  # whole values: the type may sit on a folded line
        if name.lower() == "content-type" and any(
            t in value.lower() for t in ("multipart", "message")
        ):
            return None  # parts of their own
    root = _GuardedMessage(compat32)
    for name, value in fields:
        root.set_raw(name, value.rstrip("\r\n"))
    root.set_payload(raw[end + 4 :].decode("ascii", "surrogateescape"))
    return root


def _build_tree(raw: bytes) -> Message:
    """The stdlib MIME tree (compat32: raw header values, no lazy header parsing that raises)."""
    simple = _single_part_tree(raw)
    if simple is not None:
        return simple
    built = 0

    def factory(policy: Any = compat32) -> Message:
        nonlocal built
        built += 1
        if built > _MAX_BUILT_PARTS:
            raise _TooManyParts
        # The stdlib parser checks every line against the boundary of every enclosing part:
        # nested 800 deep, 1 MB took 28 s. Parts deeper than the walk follows are not built.
        if parsers and len(vars(parsers[0])["_msgstack"]) > _MAX_DEPTH + 1:
            raise RecursionError("MIME nesting deeper than the walk follows")
        return _GuardedMessage(policy)

    parsers: list[BytesFeedParser[Message]] = []  # (the constructor builds the root part)
    parsers.append(BytesFeedParser(factory, policy=compat32))
    parsers[0].feed(raw)
    return parsers[0].close()


def _headers_only(raw: bytes) -> Message:
    """Fallback when the structure is too hostile to build: the header block alone."""
    return BytesParser(_GuardedMessage, policy=compat32).parsebytes(raw, headersonly=True)


def _first_headers(part: Message) -> dict[str, str]:
    """Lower-cased header name -> raw value of its first occurrence."""
    headers: dict[str, str] = {}
    for name, value in part.raw_items():
        headers.setdefault(name.strip().lower(), value if isinstance(value, str) else str(value))
    return headers


# --- message ids, addresses -----------------------------------------------------------------------

# Precedence values of mail sent to many (spec 2.4): automatic, never answered.
BULK_PRECEDENCE = frozenset({"bulk", "junk", "list"})
_MESSAGE_ID = re.compile(r"<([^<>]*)>")
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")  # an RFC 5322 comment (innermost, if nested)
_KEYWORD = re.compile(r"\s*([^\s;()]*)")


def _message_ids(value: str) -> tuple[str, ...]:
    ids: list[str] = []
    seen: set[str] = set()
    for m in _MESSAGE_ID.finditer(value):
        inner = "".join(m.group(1).split())
        if inner and inner not in seen:
            seen.add(inner)
            ids.append(f"<{inner}>")
    return tuple(ids[-_MAX_MESSAGE_IDS:])  # the newest are last (RFC 5322 3.6.4)


def _message_id(value: str) -> str | None:
    ids = _message_ids(value)
    if ids:
        return ids[0] if len(ids[0]) <= 1000 else None
    bare = "".join(value.split())
    if bare and len(bare) <= 998 and not any(c in bare for c in "<>"):
        return f"<{bare}>"  # Message-ID without its angle brackets
    return None


_WHITESPACE = re.compile(r"\s+")
_ATOM_RUN = re.compile(r'[^\s"(),:;<>\[]+')
_ADDR_SPEC = re.compile(
    r'[^\s\x00-\x1f\x7f<>()@,;:\\"\[\]]+@(?:[^\s\x00-\x1f\x7f<>()@,;:\\"\[\]]+|\[[^\[\]\s]+\])'
)


_QUOTED_LOCAL = re.compile(r'"((?:[^"\\\r\n]|\\.){1,64})"@(.+)')
_DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*"
)


def _mailboxes(value: str) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs of an address-list header, best effort, linear.

    A small RFC 5322 3.4 tokenizer: quoted strings, nested comments, angle addresses, groups.
    The addr-spec is '' when it is not recognisably local@domain.
    """
    value = value[:_MAX_ADDRESS_HEADER_CHARS]
    boxes: list[tuple[str, str]] = []
    words: list[str] = []
    comments: list[str] = []
    angle: str | None = None
    i, n = 0, len(value)

    def add_word(word: str) -> None:
        # adjacent words belong together: "jane.doe"@example.com, user@[192.0.2.1]
        if words and words[-1] != " ":
            words[-1] += word
        else:
            words.append(word)

    def close_mailbox() -> None:
        nonlocal words, comments, angle
        if words or comments or angle is not None:
            boxes.append(_mailbox(words, comments, angle))
        words, comments, angle = [], [], None

    while i < n and len(boxes) < 100:
        c = value[i]
        if c == '"':
            j, buf = i + 1, []
            while j < n and value[j] != '"':
                if value[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(value[j])
                j += 1
            # A quoted local part ("jane doe"@example.com) keeps its quotes: without them it
            # would be another mailbox (janedoe@). A display name loses them.
            add_word(value[i : j + 1] if value.startswith("@", j + 1) else "".join(buf))
            i = j + 1
        elif c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                ch = value[j]
                if ch == "\\":
                    j += 2
                    continue
                depth += 1 if ch == "(" else -1 if ch == ")" else 0
                j += 1
            comments.append(value[i + 1 : j - 1 if depth == 0 else n])
            i = j
        elif c == "<":
            j = value.find(">", i + 1)
            j = n if j < 0 else j
            if angle is None:
                angle = value[i + 1 : j]
            i = j + 1
        elif c in ",;":
            close_mailbox()
            i += 1
        elif c == ":":
            # "undisclosed-recipients:" group display name (RFC 5322 3.4) is no mailbox's name
            if angle is None and not any("@" in w for w in words):
                words, comments = [], []
            i += 1
        elif c == "[":  # domain literal, e.g. user@[192.0.2.1]
            j = value.find("]", i + 1)
            j = n if j < 0 else j + 1
            add_word(value[i:j])
            i = j
        elif c.isspace():
            if words and words[-1] != " ":
                words.append(" ")
            m = _WHITESPACE.match(value, i)
            i = m.end() if m else i + 1
        else:
            m = _ATOM_RUN.match(value, i)
            if m and m.end() > i:
                add_word(m.group(0))
                i = m.end()
            else:
                i += 1  # a stray ')', '>' or ']'
    close_mailbox()
    return boxes


def _mailbox(words: list[str], comments: list[str], angle: str | None) -> tuple[str, str]:
    comment = comments[0] if comments else ""
    if angle is not None:
        addr = angle.strip()
        if addr.startswith("@"):  # obsolete source route "@a,@b:user@host" (RFC 5322 4.4)
            addr = addr.partition(":")[2]
        name = "".join(words).strip() or comment
    else:
        tokens = [w for w in words if w != " "]
        at_index = max((k for k, w in enumerate(tokens) if "@" in w), default=-1)
        addr = tokens[at_index] if at_index >= 0 else ""
        # "jane@example.com (Jane)", or the broken "Jane Roe jane@example.com"
        rest = tokens[:at_index] + tokens[at_index + 1 :] if at_index >= 0 else tokens
        name = " ".join(rest) or comment
    addr = _addr_spec(addr)
    if not addr and angle is None:
        name = " ".join(w for w in words if w != " ") or comment  # keep what it says
    decoded_name, _ = _decode_words(name)
    return _collapse(decoded_name), addr.lower()


def _addr_spec(addr: str) -> str:
    """local@domain as compared and answered, or '' if it is none. A quoted local part is
    unquoted when it needs no quotes ("jane.doe"@ is jane.doe@, RFC 5321 4.1.2), else kept
    quoted with its spaces ("jane doe"@)."""
    quoted = _QUOTED_LOCAL.fullmatch(addr.strip())
    if quoted is None:
        addr = "".join(addr.split()).removesuffix(".")  # a root dot (jane@acme.example.)
        return addr if _ADDR_SPEC.fullmatch(addr) else ""
    local = _QUOTED_PAIR.sub(r"\1", quoted.group(1))
    domain = "".join(quoted.group(2).split()).removesuffix(".")
    if not local or not _ADDR_SPEC.fullmatch(f"x@{domain}"):
        return ""
    if _DOT_ATOM.fullmatch(local):
        return f"{local}@{domain}"
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"@{domain}'


def _first_sender(value: str) -> tuple[str, str]:
    """(address, display name) of the first mailbox with a usable address in a From header."""
    boxes = _mailboxes(value)
    for name, addr in boxes:
        if addr:
            return addr, name
    return "", boxes[0][0] if boxes else ""


# --- HTML -> readable text ------------------------------------------------------------------------

_TAG_NAME = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:_-]*)")
_BLOCK_TAGS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "center", "dd", "div", "dl", "dt"),
        *("fieldset", "figure", "footer", "form", "header", "hr", "li", "main", "nav", "ol"),
        *("pre", "section", "table", "tbody", "thead", "tfoot", "tr", "ul"),
    }
)
_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6"})
_CELL_TAGS = frozenset({"td", "th"})
_DROPPED_CONTENT_TAGS = frozenset({"script", "style", "title", "template"})
_CLOSING_TAG = {
    name: re.compile(rf"</\s*{name}\b", re.IGNORECASE) for name in _DROPPED_CONTENT_TAGS
}
_HTML_SPACE = re.compile(r"[ \t\r\n\f]+")
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")


class _TextOut:
    """The text _html_to_text writes. Line breaks are owed rather than written: adjacent block
    boundaries ("</div><div>") give one break, paragraphs a blank line, each <br> one more line;
    a table cell's first block owes none (Word puts a paragraph in every cell). Lines inside a
    citing blockquote start with "> " (so strip_quotes sees a quote, as in plain text), list
    items with "- " or their number."""

    __slots__ = ("cell_fresh", "in_pre", "line_start", "marker", "owed", "parts", "quote")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.owed = 0  # line breaks owed before the next text
        self.quote = 0  # blockquote depth
        self.in_pre = 0
        self.line_start = True
        self.cell_fresh = False  # in a table cell, no text yet
        self.marker = ""  # a list item's "- " or "1. ", written before its first text

    def owe(self, breaks: int, *, more: bool = False) -> None:
        if not self.cell_fresh:
            self.owed = self.owed + breaks if more else max(self.owed, breaks)

    @property
    def prefix(self) -> str:
        return "> " * min(self.quote, _MAX_QUOTE_MARKS)

    def text(self, text: str) -> None:
        if self.owed:
            if not self.in_pre and text.isspace():
                return  # source indentation between blocks
            # A blank line inside a quote is a quoted blank line (">"), as in plain text; runs
            # of them are cut like blank lines outside (by _BLANK_LINE_RUNS).
            owed = min(self.owed, 3) if self.quote else self.owed
            self.parts.append("\n" + (self.prefix.rstrip() + "\n") * (owed - 1))
            self.owed = 0
            self.line_start = True
        if self.line_start:
            if text.isspace():
                self.parts.append(text)
                return
            self.parts.append(self.prefix + self.marker)
            self.marker = ""
            self.line_start = False
        self.cell_fresh = self.cell_fresh and text.isspace()
        if self.quote and self.in_pre and "\n" in text:
            # a <pre> in a quote (Thunderbird's quote of a plain-text mail): every line quoted
            text = text.replace("\n", "\n" + self.prefix)
        self.parts.append(text)


# Spaces, tabs and no-break spaces inside <pre> stand in as Unicode noncharacters (which no
# text may hold: any in the source is replaced first) until the white-space collapse is done.
_PRE_SPACE = {0x20: "\ufdd0", 0x09: "\ufdd1", 0xA0: "\ufdd2", 0x0D: None}
_PRE_SPACE_BACK = {0xFDD0: " ", 0xFDD1: "\t", 0xFDD2: "\xa0"}
_STAND_INS = re.compile("[\ufdd0-\ufdd2]")
_MAX_QUOTE_MARKS = 8  # "> " a quote level, up to this many: nested quotes cost linear text
# A <blockquote> that quotes (a reply's citation) rather than indents (Gmail's and Apple Mail's
# "Indent" is a blockquote with no border).
_CITATION = re.compile(r"""type\s*=\s*["']?cite|class\s*=\s*["'][^"']*quote|border-left""", re.I)
# GMX, WEB.DE and mail.com quote in <div name="quote" style="border-left:…">, no <blockquote>.
# Only that name makes a <div> cite: Gmail's <div class="gmail_quote"> also holds a forwarded
# message, and a signature may have a left border.
_CITING_DIV = re.compile(r"""\sname\s*=\s*["']?quote\b""", re.I)
# The elements that may quote, and what in an opening tag says that one does.
_QUOTING_TAGS = {"blockquote": _CITATION, "div": _CITING_DIV}
_HREF = re.compile(r"""\shref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)
_URL_SPACE = {ord(c): None for c in "\t\r\n"}
_MAX_HREF_CHARS = 500  # longer targets (tracking links) would bury the text they belong to


# A data: URI (an image pasted into the mail) in an attribute or a style's url(), with at least
# _MIN_SKIPPED_DATA_URI characters of payload before any "=" (base64 has it only as padding at
# its end) or "(": a try from "=" or "url(" reads no further than the next "=" or "(", where
# the next try starts, so a hostile source costs one linear scan; no backtracking (possessive
# quantifiers).
_DATA_URI = re.compile(
    rf"""(?:=|url\()\s*+(?:["']|&quot;)?+data:[^"'<>()&\s=]{{{_MIN_SKIPPED_DATA_URI}}}""",
    re.IGNORECASE,
)
_DATA_URI_REST = re.compile(r"""[^"'<>)&\s]*+""")  # the rest of its payload, padding too


def _without_data_uris(source: str, limit: int) -> str:
    """The HTML source with the payloads of its long data: URIs left out ("data:" stays), cut
    at `limit` characters of what is left. A screenshot pasted as a data URI is megabytes of
    base64 in one tag, which _html_to_text skips with one str.find: counted in its cut, it
    pushed the text below the picture out. Memory stays within `limit`; time is a scan of
    the source (in C) up to the cut."""
    kept: list[str] = []
    size = pos = 0
    while True:
        # a data URI whose payload starts before the cut (its first characters are in reach)
        end = pos + (limit - size) + _MIN_SKIPPED_DATA_URI + 64
        found = _DATA_URI.search(source, pos, end)
        if found is None:
            break
        payload = found.end() - _MIN_SKIPPED_DATA_URI
        if payload - pos > limit - size:
            break  # past the cut
        kept.append(source[pos:payload])
        size += payload - pos
        rest = _DATA_URI_REST.match(source, found.end())
        pos = found.end() if rest is None else rest.end()
    kept.append(source[pos : pos + limit - size])
    return "".join(kept)


def _html_to_text(source: str) -> str:
    """Readable text from HTML: tags gone, scripts/styles dropped, blocks as line breaks
    (`_TextOut`), table cells apart by " | ", a link's target after its text.

    A single forward scan with str.find, so unclosed comments or tags cost linear time (the
    stdlib HTMLParser of this Python is quadratic on some of them).
    """
    source = source[:_MAX_HTML_CHARS]
    if _STAND_INS.search(source):  # noncharacters: never text, and <pre>'s stand-ins here
        source = _STAND_INS.sub("\ufffd", source)
    stand_ins = False  # whether a <pre> put any in
    out = _TextOut()
    lists: list[list[int]] = []  # open lists: [number of the next item, or 0 when bulleted]
    cells = 0  # cells begun in the current table row
    link: tuple[str, int] | None = None  # an open link's target and where its text begins
    # Per _QUOTING_TAGS name, its open elements: whether each quotes (a blockquote that does
    # not indents; a div that does not is any div).
    quoting: dict[str, list[bool]] = {name: [] for name in _QUOTING_TAGS}
    pos, n = 0, len(source)

    while pos < n:
        lt = source.find("<", pos)
        chunk = source[pos:] if lt < 0 else source[pos:lt]
        if chunk:
            if out.in_pre:  # its spaces survive the collapse below (console output's columns)
                out.text(html.unescape(chunk).translate(_PRE_SPACE))
                stand_ins = True
            else:
                out.text(html.unescape(_HTML_SPACE.sub(" ", chunk)))
        if lt < 0:
            break
        if source.startswith("<!--", lt):
            end = source.find("-->", lt + 4)
            if end < 0:
                break  # an unclosed comment runs to the end
            pos = end + 3
            continue
        if source[lt + 1 : lt + 2] in ("!", "?"):  # doctype, CDATA, processing instruction
            end = source.find(">", lt + 2)
            if end < 0:
                break
            pos = end + 1
            continue
        m = _TAG_NAME.match(source, lt)
        if m is None:
            out.text("<")  # a literal '<'
            pos = lt + 1
            continue
        end = source.find(">", m.end())
        if end < 0:
            break  # a tag cut off by the end of the document
        pos = end + 1
        closing, name = m.group(1) == "/", m.group(2).lower()
        if name in _DROPPED_CONTENT_TAGS and not closing:
            if source[end - 1] == "/":
                continue  # <script/>
            close = _CLOSING_TAG[name].search(source, pos)
            if close is None:
                break  # unclosed script/style: the rest is not text
            end = source.find(">", close.end())
            if end < 0:
                break
            pos = end + 1
            continue
        if name == "a":
            if closing and link is not None:
                target, begin = link
                written = "".join(out.parts[begin:])
                if written.strip() and target not in written:
                    out.parts.append(f" <{target}>")
                link = None
            elif not closing:
                href = _HREF.search(source, m.end(), end)
                target = (
                    html.unescape(next(g for g in href.groups() if g is not None)) if href else ""
                )
                target = target.strip().translate(_URL_SPACE)  # as a browser reads it
                link = (
                    (target, len(out.parts))
                    if target.lower().startswith(("http://", "https://"))
                    and len(target) <= _MAX_HREF_CHARS
                    else None
                )
        elif name == "br":
            out.owe(1, more=True)
        elif name == "pre":
            out.in_pre = max(0, out.in_pre - 1) if closing else out.in_pre + 1
            out.owe(1)
        elif name in _PARAGRAPH_TAGS:
            out.owe(2)
        elif name in _CELL_TAGS:
            if closing:  # the cell's last paragraph owes nothing: the row goes on
                out.cell_fresh = False
                out.owed = 0
            else:
                if cells:
                    out.owed = 0
                    out.text(" | ")
                cells += 1
                out.cell_fresh = True
        elif name in _BLOCK_TAGS:
            if name == "tr":
                cells = 0
                out.cell_fresh = False
            elif name in _QUOTING_TAGS:
                opened = quoting[name]
                if not closing:
                    opened.append(_QUOTING_TAGS[name].search(source, m.end(), end) is not None)
                    out.quote += opened[-1]
                elif opened:
                    out.quote -= opened.pop()
            elif name in ("ul", "ol"):
                if closing:
                    if lists:
                        lists.pop()
                else:
                    lists.append([1 if name == "ol" else 0])
            elif name == "li" and not closing:
                item = lists[-1] if lists else [0]
                out.marker = f"{item[0]}. " if item[0] else "- "
                item[0] += 1 if item[0] else 0
            out.owe(1)
    lines = (" ".join(line.split()) for line in "".join(out.parts).split("\n"))
    text = _BLANK_LINE_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")
    return text.translate(_PRE_SPACE_BACK) if stand_ins else text


# --- auto-reply and delivery-report recognition (spec 2.3.2) ------------------------------------

# Subject prefixes of out-of-office / auto-replies in the languages MSP customers write in,
# followed by a separator ("Automatic reply: …", "Out of Office - back Monday", "Automatische
# Antwort (Abwesenheit)") or by nothing but "." or "!"; "out of office" also by "until", "till"
# or "back". "Out of office not working in Outlook" is a customer's request, not an auto-reply.
_AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(?:auto\s?[:：]"
    r"|out of (?:the )?office\s+(?:until|till|back)\b"
    r"|(?:automatic reply|auto(?:matic)?[ -]?(?:reply|response|responder)|autoreply|"
    r"out of (?:the )?office(?:\s+auto[ -]?reply|\s+reply)?|abwesenheitsnotiz|"
    r"automatische antwort|r[ée]ponse automatique|autosvar|automatisk svar|"
    r"automatisch antwoord|respuesta autom[áa]tica|risposta automatica|resposta autom[áàa]tica|"
    r"automaattinen vastaus|automatick[áa] odpov[ěe]ď|odpowied[źz] automatyczna|"
    r"automatikus v[áa]lasz|otomatik yan[ıi]t|r[ăa]spuns automat|"
    r"automatski odgovor|samodejni odgovor|trả lời tự động|"
    r"автоматический ответ|автоматична відповідь|автоматичен отговор|"
    r"αυτόματη απάντηση|自動回覆|自动回复|自動応答|自動返信|자동 회신)"
    r"\s*(?:[:：\-–—(\[（]|[.!]*\s*$))",
    re.IGNORECASE,
)

# The prefix a mail client puts before a forwarded message's subject (FW, Fwd; German WG,
# French TR, Spanish RV, Portuguese ENC, Italian Outlook I, Swedish VB, Finnish VL, Dutch
# Doorst; Outlook's Polish PD, Czech PŘ, Chinese 转发 / 轉寄 (and 轉發), Korean 전달, Turkish
# İLT (İ folds to i), Greek ΠΡΘ, Hungarian Továbbítás), optionally with a count
# ("Fwd[2]:"), the colon also full-width. Not Danish and Norwegian VS: it is the Finnish reply's
# prefix. (rules.regular.is_forward tells a forward by it; here a mailbox rule's forward is told
# from Exchange's automatic answers.)
FORWARD_PREFIX = re.compile(
    r"^\s*(?:fwd?|wg|tr|rv|enc|i|vb|vl|doorst|pd|př|转发|轉寄|轉發|전달|ilt|πρθ|továbbítás)"
    r"\s*(?:\[\d+\])?\s*[:：]",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery status notification|mail delivery fail|returned mail|"
    r"delivery failure|delivery has failed|failure notice|non-?delivery|nondeliverable|"
    r"message not delivered|delivery notification|unzustellbar|non remis|onbestelbaar|"
    r"nicht zugestellt",
    re.IGNORECASE,
)
# Local parts of the senders of bounces: their mail is a report (here) and never acknowledged
# (rules.regular.is_robot_address).
ROBOT_LOCALPARTS = frozenset({"mailer-daemon", "postmaster", "mailerdaemon", "mail-daemon"})
_DELIVERY_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_DISPOSITION_TYPES = frozenset(
    {"message/disposition-notification", "message/global-disposition-notification"}
)


_NO = frozenset({"no", "false", "0", "off"})


def _auto_reply_header(headers: dict[str, str]) -> bool:
    """Vendor headers of autoresponders (RFC 3834 predecessors); X-Auto-Response-Suppress alone
    is not one: Exchange puts it on many mails that are no replies."""

    def value(name: str) -> str:
        return _collapse(_raw_header_text(headers.get(name, ""))).lower()

    return (
        # present, unless it says no ("X-Autoreply: no" on mail that is none)
        any(name in headers and value(name) not in _NO for name in ("x-autoreply", "x-autorespond"))
        or "reply" in value("x-autogenerated")
        or value("precedence") == "auto_reply"
        or value("x-precedence") == "auto_reply"
        or "autoresponder" in value("x-post-messageclass")
        or value("delivered-to") == "autoresponder"
    )


# Forward prefixes that FORWARD_PREFIX leaves out as it must ("VS:" answers in Finnish) but
# that a mailbox rule's forward may carry: Danish/Norwegian, Icelandic, Estonian, Latvian and
# Lithuanian, Hebrew. Where the rule's marks are there, no answer has them.
_RULES_FORWARD_PREFIX = re.compile(r"^\s*(?:vs|fs|edasi|prs|הועבר)\s*[:：]", re.IGNORECASE)


def _exchange_rules_answer(headers: dict[str, str], subject: str) -> bool:
    """Whether a mail marked `Auto-Submitted: auto-generated` that has an In-Reply-To is an
    Exchange out-of-office (or a rule's reply with a template), whatever language its subject
    is in: Exchange marks them so (not RFC 3834's auto-replied) and says that the mailbox's
    rules wrote them (X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent, or
    X-MS-Exchange-Inbox-Rules-Loop). Those rules also forward ("FW: …") and redirect
    (Resent-From) a person's mail, its In-Reply-To and all: that is no answer."""
    source = _collapse(_raw_header_text(headers.get("x-ms-exchange-generated-message-source", "")))
    return (
        (source.lower() == "mailbox rules agent" or "x-ms-exchange-inbox-rules-loop" in headers)
        and "resent-from" not in headers
        and FORWARD_PREFIX.match(subject) is None
        and _RULES_FORWARD_PREFIX.match(subject) is None
    )


# --- the parser -----------------------------------------------------------------------------------

_DEFECT_NAMES = {
    "NoBoundaryInMultipartDefect": "multipart without boundary",
    "StartBoundaryNotFoundDefect": "multipart start boundary not found",
    "CloseBoundaryNotFoundDefect": "multipart close boundary missing",
    "FirstHeaderLineIsContinuationDefect": "first header line is a continuation",
    "MisplacedEnvelopeHeaderDefect": "misplaced envelope header",
    "MissingHeaderBodySeparatorDefect": "malformed header line",
    "MultipartInvariantViolationDefect": "multipart without parts",
    "InvalidMultipartContentTransferEncodingDefect": "transfer encoding on multipart",
}


@dataclass(slots=True, eq=False)
class _Leaf:
    part: Message
    content_type: str
    charset: str | None
    transfer_encoding: str
    is_attachment: bool
    filename: str | None
    nested: bool  # inside an enclosed message/rfc822
    embedded: bool = False  # a message/* part (its payload is the enclosed message)
    decoded: bytes | None = field(default=None, repr=False)
    text: str | None = field(default=None, repr=False)  # its body text, once made (text_of)
    parent: int = 0  # the multipart it is a part of (its number in the walk; 0: none)
    in_alternative: bool = False  # that multipart is multipart/alternative
    params: dict[str, str] = field(default_factory=dict, repr=False)  # of its Content-Type


class _Parser:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.defects: list[str] = []
        self.recovered = 0  # parts parsed again (recover): each costs a parse of its bytes
        self.enclosed_loops: set[str] = set()  # loop values in encoded enclosures (note_loops)
        self.encloses_forward = False  # an action field there too (note_loops)

    def defect(self, note: str) -> None:
        if note not in self.defects and len(self.defects) < _MAX_DEFECTS:
            self.defects.append(note)

    def run(self) -> ParsedMessage:
        raw = self.raw if isinstance(self.raw, bytes) else bytes(self.raw)
        if len(raw) > _MAX_RAW_BYTES:
            self.defect("message too large: parsed in part")
            raw = raw[:_MAX_RAW_BYTES]
        structure_ok = True
        try:
            root = _build_tree(raw)
        except _TooManyParts:
            self.defect("too many MIME parts: body not parsed")
            root, structure_ok = _headers_only(raw), False
        except RecursionError:
            self.defect("MIME nesting too deep: body not parsed")
            root, structure_ok = _headers_only(raw), False
        except Exception as exc:  # whatever else the stdlib parser trips on: keep the headers
            self.defect(f"MIME structure not parsed ({type(exc).__name__})")
            root, structure_ok = _headers_only(raw), False
        headers = _first_headers(root)

        subject = ""
        if "subject" in headers:
            subject, clean = _header_words(headers["subject"])
            subject = nfc(subject)  # rules and account keys compare in NFC
            if not clean:
                self.defect("undecodable subject")
            if len(subject) > _MAX_SUBJECT_CHARS:
                subject = subject[:_MAX_SUBJECT_CHARS].rstrip()
                self.defect("subject truncated")
        from_address = from_name = ""
        if "from" in headers:
            from_address, from_name = _first_sender(_raw_header_text(headers["from"]))
            if not from_address:
                self.defect("unparseable From")

        walked = self.walk(root) if structure_ok else _Walk([], False, False)
        body = self.body_fields(walked.leaves)

        # spec 2.3.2: delivery reports (RFC 3464), or a bounce-worded mail from a mailer daemon
        is_report = walked.delivery_report or (
            self.daemon_sender(from_address, headers.get("from", ""))
            and _BOUNCE_SUBJECT.search(subject) is not None
        )
        auto_submitted = self.keyword(headers, "auto-submitted")
        precedence = self.keyword(headers, "precedence")
        in_reply_to = _message_ids(_raw_header_text(headers.get("in-reply-to", "")))
        references = _message_ids(_raw_header_text(headers.get("references", "")))
        # A subject alone is no proof: "Out of office: please set it up for Jane" is a request.
        # An out-of-office answers a mail (In-Reply-To/References) or says it is automatic.
        answers_or_automatic = bool(
            in_reply_to
            or references
            or auto_submitted not in (None, "no")
            or precedence in BULK_PRECEDENCE
            or "x-auto-response-suppress" in headers
        )
        is_auto = (
            is_report
            or walked.read_receipt  # RFC 8098 disposition notifications are machine answers too
            or auto_submitted == "auto-replied"  # RFC 3834
            or _auto_reply_header(headers)
            or (answers_or_automatic and _AUTO_REPLY_SUBJECT.match(subject) is not None)
            or (
                auto_submitted == "auto-generated"
                and bool(in_reply_to)
                and _exchange_rules_answer(headers, subject)
            )
        )
        message_id = headers.get("message-id")
        return ParsedMessage(
            subject=subject,
            from_address=from_address,
            from_name=from_name,
            message_id=None if message_id is None else _message_id(_raw_header_text(message_id)),
            in_reply_to=in_reply_to,
            references=references,
            auto_submitted=auto_submitted,
            precedence=precedence,
            list_id="list-id" in headers,
            list_unsubscribe="list-unsubscribe" in headers,
            auto_response_suppress="x-auto-response-suppress" in headers,
            loop_header=self.keyword(headers, "x-smtpgate-loop", whole=True),
            is_auto_reply=is_auto,
            is_delivery_report=is_report,
            text=body.text,
            html_only=body.html_only,
            attachments=body.attachments,
            xml_candidates=body.xml_candidates,
            defects=tuple(self.defects),
            xml_charsets=body.xml_charsets,
            report_structure=walked.delivery_report or walked.read_receipt,
            long_lines=has_long_line(raw),
            enclosed_loop_markers=frozenset(self.enclosed_loops),
            encloses_forward=self.encloses_forward,
        )

    # headers

    @staticmethod
    def keyword(headers: dict[str, str], name: str, *, whole: bool = False) -> str | None:
        """Lower-cased header value, or its leading keyword: RFC 3834 allows comments and
        parameters, as in "auto-replied (vacation)" or "auto-replied; owner-email=…"."""
        if name not in headers:
            return None
        value = _collapse(_raw_header_text(headers[name])).lower()
        if whole:
            return value
        for _ in range(4):  # comments nest; deeper than that is not a header we act on
            value, removed = _COMMENT.subn(" ", value)
            if not removed:
                break
        found = _KEYWORD.match(value)
        return found.group(1) if found else ""

    @staticmethod
    def daemon_sender(address: str, raw_from: str) -> bool:
        if address:
            return address.partition("@")[0] in ROBOT_LOCALPARTS
        return "mailer-daemon" in raw_from.lower()

    # structure

    def walk(self, root: Message) -> _Walk:
        """Depth-first in document order, bounded in depth and part count. Report parts count
        only outside enclosed messages (a forwarded bounce is not a bounce)."""
        walked = _Walk([], False, False)
        # (part, depth, inside an enclosed message, its multipart's number, that is alternative)
        stack: list[tuple[Message, int, bool, int, bool]] = [(root, 0, False, 0, False)]
        seen = 0
        while stack:
            part, depth, nested, parent, in_alternative = stack.pop()
            seen += 1
            if seen > _MAX_PARTS:
                self.defect("too many MIME parts: rest ignored")
                break
            for note in _iter_defects(part):
                self.defect(note)
            headers = _first_headers(part)
            content_type, params = self.content_type(part, headers)
            payload = getattr(part, "_payload", None)  # raw; get_payload() re-decodes lossily
            if content_type in _DELIVERY_STATUS_TYPES:
                walked.delivery_report = walked.delivery_report or not nested
                continue
            if content_type in _DISPOSITION_TYPES:
                walked.read_receipt = walked.read_receipt or not nested
                continue
            if not isinstance(payload, list):
                recovered = (
                    self.recover(content_type, headers, payload)
                    if content_type.startswith(("multipart/", "message/"))
                    else None
                )
                if recovered is not None:  # parsed again: its parts follow in its place
                    nested = nested or content_type.startswith("message/")
                    stack.append((recovered, depth + 1, nested, parent, in_alternative))
                    continue
                leaf = self.leaf(part, headers, content_type, params, nested, False)
                leaf.parent, leaf.in_alternative = parent, in_alternative
                walked.leaves.append(leaf)
                if (
                    content_type == "text/rfc822-headers"
                    and walked.delivery_report
                    and leaf.transfer_encoding in ("base64", "quoted-printable")
                ):  # a report's returned headers, encoded (RFC 6522)
                    self.note_loops(self.data(leaf))
                continue
            if content_type == "multipart/report" and not nested:
                report_type = params.get("report-type", "").lower()
                walked.delivery_report |= report_type == "delivery-status"
                walked.read_receipt |= report_type == "disposition-notification"
            is_message = content_type.startswith("message/")
            if is_message:  # message/rfc822: the enclosed message itself may be an attachment
                walked.leaves.append(self.leaf(part, headers, content_type, params, nested, True))
                encoded = _encoded_message(payload, headers)
                if encoded is not None:  # base64: the parser read its text as a headerless body
                    recovered = self.recover(content_type, headers, encoded)
                    if recovered is not None:
                        stack.append((recovered, depth + 1, True, seen, False))
                        continue
            if depth + 1 > _MAX_DEPTH:
                self.defect("MIME nesting too deep: inner parts ignored")
                continue
            children = [p for p in payload if isinstance(p, Message)]
            alternative = content_type == "multipart/alternative"
            stack.extend(
                (p, depth + 1, nested or is_message, seen, alternative) for p in reversed(children)
            )
        return walked

    def recover(
        self, content_type: str, headers: dict[str, str], payload: object
    ) -> Message | None:
        """A part the stdlib parser left unparsed that readers still show, parsed again: a
        multipart whose boundary parameter was lost (PHP scripts write it on an unindented
        line, which ends the header), the first "--" line giving the boundary; an enclosed
        message in base64 or quoted-printable (RFC 2046 forbids it; clients send it)."""
        if not isinstance(payload, str) or not payload or self.recovered >= _MAX_RECOVERED:
            return None
        try:
            return self._recover(content_type, headers, payload)
        except Exception as exc:  # too many parts, too deep, whatever else: left as it is
            self.defect(f"unparsed part left as it is ({type(exc).__name__})")
            return None

    def _recover(self, content_type: str, headers: dict[str, str], payload: str) -> Message | None:
        if content_type.startswith("multipart/"):
            found = _GUESSED_BOUNDARY.search(payload[:_MAX_PREAMBLE_CHARS])
            if found is None:
                return None
            boundary = found.group(1)
            if f"--{boundary}" not in payload[found.end() :]:
                return None
            self.defect("multipart boundary guessed from its first delimiter line")
            self.recovered += 1
            head = f'Content-Type: {content_type}; boundary="{boundary}"\r\n\r\n'
            return _build_tree(head.encode() + _to_bytes(payload))
        if content_type.startswith("message/"):
            cte = _transfer_encoding(headers)
            if cte not in ("base64", "quoted-printable"):
                return None
            self.recovered += 1
            data = self.decode_transfer(payload, cte)
            self.note_loops(data)
            return _build_tree(data)
        return None

    def note_loops(self, data: bytes) -> None:
        """The X-Smtpgate-Loop values anywhere in decoded enclosed bytes (a message, returned
        headers, a message enclosing ours): a search of the raw bytes cannot see them. At most
        _MAX_LOOP_VALUES (a hostile report held 670,000, each then checked on the loop); and
        whether an X-Smtpgate-Action field is there too (a forward of ours, bounced)."""
        if not self.encloses_forward and _LOOP_VALUE.search(data):
            self.encloses_forward = _ACTION_FIELD.search(data) is not None
        for m in _LOOP_VALUE.finditer(data):
            if len(self.enclosed_loops) >= _MAX_LOOP_VALUES:
                return
            self.enclosed_loops.add(m.group(1).decode("utf-8", "replace").lower())

    def content_type(self, part: Message, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        value = headers.get("content-type")
        if value is None:
            return part.get_default_type(), {}
        content_type, params = _parse_params(_raw_header_text(value))
        content_type = "".join(content_type.split())
        if content_type == "plain/text":  # written by scripts often enough: no type of its own
            content_type = "text/plain"
        if content_type.count("/") != 1 or not all(content_type.partition("/")[::2]):
            self.defect("malformed Content-Type")
            return part.get_default_type(), params
        return content_type, params

    def leaf(
        self,
        part: Message,
        headers: dict[str, str],
        content_type: str,
        params: dict[str, str],
        nested: bool,
        embedded: bool,
    ) -> _Leaf:
        disposition, dparams = _parse_params(
            _raw_header_text(headers.get("content-disposition", ""))
        )
        filename = _clean_filename(dparams.get("filename") or params.get("name"))
        return _Leaf(
            part=part,
            content_type=content_type,
            charset=params.get("charset"),
            transfer_encoding=_transfer_encoding(headers),
            is_attachment=disposition == "attachment" or filename is not None,
            filename=filename,
            nested=nested,
            embedded=embedded,
            params=params,
        )

    def data(self, leaf: _Leaf) -> bytes:
        """A leaf's payload with the transfer encoding removed (cached)."""
        if leaf.decoded is None:
            payload = getattr(leaf.part, "_payload", None)
            text = payload if isinstance(payload, str) else ""
            leaf.decoded = self.decode_transfer(text, leaf.transfer_encoding)
        return leaf.decoded

    def decode_transfer(self, payload: str, cte: str) -> bytes:
        data = _to_bytes(payload)
        if cte == "base64":
            decoded, ok = _b64decode_lenient(data)
            if not ok:
                self.defect("broken base64")
            return decoded
        if cte == "quoted-printable":
            try:
                # RFC 2045 6.7 (3): white space ending an encoded line is transport padding
                # ("=  " is still a soft line break).
                return binascii.a2b_qp(_QP_TRAILING_SPACE.sub(b"", data))
            except (binascii.Error, ValueError):
                self.defect("broken quoted-printable")
                return data
        if cte in ("x-uuencode", "uuencode", "x-uue", "uue"):
            return self.decode_uu(data)
        if cte not in ("", "7bit", "8bit", "binary"):
            self.defect(f"unknown transfer encoding {cte[:40]!r}")
        return data

    def decode_uu(self, data: bytes) -> bytes:
        out: list[bytes] = []
        started = False
        for line in data.splitlines():
            if not started:
                started = line.startswith(b"begin ")
                continue
            if line.strip() in (b"end", b"`"):
                break
            try:
                out.append(binascii.a2b_uu(line))
            except (binascii.Error, ValueError):
                self.defect("broken uuencode")
        return b"".join(out)

    # body

    def body_fields(self, leaves: list[_Leaf]) -> _Body:
        chosen: list[_Leaf] = []
        # The outer message's own text first; an enclosed message's text only if it has none.
        for nested in (False, True):
            chosen = self.body_leaves(
                [
                    leaf
                    for leaf in leaves
                    if leaf.nested == nested and not leaf.embedded and not leaf.is_attachment
                ]
            )
            if chosen:
                break
        body = chosen[0] if chosen else None
        html_only = body is not None and _text_kind(body.content_type) == "html"
        texts = [self.text_of(leaf) for leaf in chosen]
        # One line end between parts; the last keeps its own.
        text = "\n".join([*(t.rstrip("\n") for t in texts[:-1]), *texts[-1:]])
        if len(text) > _MAX_TEXT_CHARS:
            text = text[:_MAX_TEXT_CHARS]
            self.defect("body text truncated")

        outer = [leaf for leaf in leaves if not leaf.nested]
        attachments = tuple(
            Attachment(
                filename=leaf.filename,
                content_type=leaf.content_type,
                size=_embedded_size(leaf.part) if leaf.embedded else len(self.data(leaf)),
                digest="" if leaf.embedded else hashlib.sha256(self.data(leaf)).hexdigest()[:16],
                # (Gmail gives attached files a Content-ID too: their disposition tells.)
                inline=leaf.content_type.startswith("image/")
                and "content-id" in leaf.part
                and leaf.part.get_content_disposition() != "attachment",
            )
            for leaf in outer
            if leaf.is_attachment and leaf is not body
        )

        # The body's plain parts first (a script's cover note, then the XML as a second one).
        xml_leaves = [
            leaf for leaf in chosen if not leaf.nested and _text_kind(leaf.content_type) == "plain"
        ]
        xml_leaves += [
            leaf
            for leaf in outer
            if leaf.content_type in ("text/xml", "application/xml")
            and all(leaf is not chosen for chosen in xml_leaves)
        ]
        xml_leaves += [
            leaf
            for leaf in outer
            if leaf.is_attachment
            and not leaf.embedded
            and (leaf.filename or "").lower().endswith(".xml")
            and all(leaf is not chosen for chosen in xml_leaves)
        ]
        xml_candidates: list[bytes] = []
        xml_charsets: list[str | None] = []
        for leaf in xml_leaves:
            # Over the limit, its start still says whether it is a transaction (then refused as
            # too large, 150012) or ordinary mail; its end is never read.
            data = self.data(leaf)[: _MAX_XML_BYTES + 1]  # bytes: no copy when shorter
            if not data.strip():
                continue
            # RFC 7303 3: the charset of text/xml, application/xml and +xml parts decides (an
            # attachment's application/octet-stream has none that means anything).
            labelled = (
                leaf.content_type.startswith("text/")
                or leaf.content_type == "application/xml"
                or leaf.content_type.endswith("+xml")
            )
            charset = _codec_for(leaf.charset) if labelled else None
            if (
                leaf.content_type == "text/plain"
                and leaf.params.get("format", "").lower() == "flowed"
                and data.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"<"  # not any mail
            ):
                data, charset = _unflowed_xml(data, charset, leaf.params)
            xml_candidates.append(data)
            xml_charsets.append(charset)
        return _Body(text, html_only, attachments, tuple(xml_candidates), tuple(xml_charsets))

    def body_leaves(self, inline: list[_Leaf]) -> list[_Leaf]:
        """The parts that make the body text, in document order, as a mail reader shows them:
        of each multipart/alternative its plain text (its HTML when the plain text is blank
        or missing), then the text parts after it that are not alternatives of it (a text,
        an inline image, more text; a footer a list or virus scanner appended). The first is
        the body; it may be HTML, the others are plain text."""
        units: list[list[_Leaf]] = []
        alternatives: dict[int, list[_Leaf]] = {}
        for leaf in inline:
            if _text_kind(leaf.content_type) is None:
                continue
            if leaf.in_alternative:
                group = alternatives.get(leaf.parent)
                if group is None:
                    group = alternatives[leaf.parent] = []
                    units.append(group)
                group.append(leaf)
            else:
                units.append([leaf])
        chosen: list[_Leaf] = []
        for unit in units:
            plain = [leaf for leaf in unit if _text_kind(leaf.content_type) == "plain"]
            best = next((leaf for leaf in plain if _has_text(self.text_of(leaf))), None)
            if best is None and not chosen:
                html = [leaf for leaf in unit if _text_kind(leaf.content_type) == "html"]
                # text/html before Apple's watch-html or Gmail's AMP version of it
                best = next((leaf for leaf in html if leaf.content_type == "text/html"), None)
                best = best or next(iter(html), None)
                if best is not None and not _has_text(self.text_of(best)):
                    best = None
            if best is not None:
                chosen.append(best)
        if not chosen and units:  # only blank text: the first part, as before
            chosen.append(units[0][0])
        return chosen

    def text_of(self, leaf: _Leaf) -> str:
        """A text part's text: decoded, HTML reduced to text, format=flowed unwrapped, line
        ends as LF, control characters dropped (cached)."""
        if leaf.text is not None:
            return leaf.text
        data = self.data(leaf)
        charset = leaf.charset
        html = _text_kind(leaf.content_type) == "html"
        if charset is None and html:  # <meta charset> when the MIME header names none
            meta = _META_CHARSET.search(data[:_META_SNIFF_BYTES])
            charset = meta.group(1).decode("ascii") if meta else None
        text, ok = _decode_bytes(data, charset)
        if not ok:
            self.defect("body charset did not fit")
        text = text.removeprefix("\ufeff")
        if html:
            if len(text) > _MAX_HTML_CHARS:  # pasted images (data: URIs) are no work to skip
                text = _without_data_uris(text, _MAX_HTML_CHARS + 1)
                if len(text) > _MAX_HTML_CHARS:
                    self.defect("HTML body truncated")
            text = _html_to_text(text)
        text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_TEXT_CONTROLS)
        text = text[: _MAX_TEXT_CHARS + 1]  # the body is cut there (body_fields says so)
        if not html and leaf.params.get("format", "").lower() == "flowed":
            text = _unflow(text, delsp=leaf.params.get("delsp", "").lower() == "yes")
        leaf.text = text
        return text


def _encoded_message(payload: list[Message], headers: dict[str, str]) -> str | None:
    """The still encoded text of an enclosed message sent in base64, or None."""
    if _transfer_encoding(headers) != "base64" or len(payload) != 1:
        return None
    inner = payload[0]
    text = getattr(inner, "_payload", None)
    return text if isinstance(text, str) and not inner.keys() else None


def _has_text(text: str) -> bool:
    return bool(text) and not text.isspace()  # (no stripped copy of a long text)


def _text_kind(content_type: str) -> str | None:
    """'html', 'plain' (text/plain and text/* subtypes that are not data, RFC 2046 4.1.4), or
    None for a part that is no body text."""
    if content_type == "text/plain":  # (the common case first: once or twice a message)
        return "plain"
    if not content_type.startswith("text/"):
        return None
    if "html" in content_type:  # text/html; text/watch-html, text/x-amp-html reduced alike
        return "html"
    if content_type in _TEXT_DATA_TYPES or any(m in content_type for m in _TEXT_MARKUP):
        return None
    return "plain"


def _unflowed_xml(
    data: bytes, charset: str | None, params: dict[str, str]
) -> tuple[bytes, str | None]:
    """A format=flowed body as an XML candidate: its unflowed text (RFC 3676), in UTF-8.
    Thunderbird breaks long lines after a space, Apple Mail (delsp=yes) inside a tag name too.
    Bytes its charset does not fit stay as they are, for the XML reader to judge."""
    text, ok = _decode_bytes(data, charset)
    if not ok:
        return data, charset
    text = text.replace("\r\n", "\n")
    return _unflow(text, delsp=params.get("delsp", "").lower() == "yes").encode(), "utf-8"


def _unflow(text: str, *, delsp: bool) -> str:
    """RFC 3676 format=flowed as plain text: a line ending in a space (a soft break) is joined
    with the next one of the same quote depth; the space-stuffing of a line goes; with
    delsp=yes the space of the soft break goes too (it was added inside a word)."""
    out: list[str] = []
    paragraph: list[str] = []  # the pieces of the flowed line being joined (joined once)
    depth_of = -1  # its quote depth; -1: none pending
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:].removeprefix(" ")
        soft = content.endswith(" ") and content != "-- "  # the signature line is no soft break
        if soft and delsp:
            content = content[:-1]
        if paragraph and depth != depth_of:
            out.append(_quoted(depth_of, "".join(paragraph)))
            paragraph = []
        paragraph.append(content)
        depth_of = depth
        if not soft:
            out.append(_quoted(depth, "".join(paragraph)))
            paragraph = []
    if paragraph:
        out.append(_quoted(depth_of, "".join(paragraph)))
    return "\n".join(out)


def _quoted(depth: int, text: str) -> str:
    return f"{'>' * depth} {text}" if depth else text


def _transfer_encoding(headers: dict[str, str]) -> str:
    """Content-Transfer-Encoding's value, lower case, without comments or parameters."""
    value = _COMMENT.sub(" ", _raw_header_text(headers.get("content-transfer-encoding", "")))
    return _collapse(value).lower().partition(";")[0].strip().strip('"')


@dataclass(slots=True)
class _Walk:
    leaves: list[_Leaf]
    delivery_report: bool
    read_receipt: bool


@dataclass(frozen=True, slots=True)
class _Body:
    text: str
    html_only: bool
    attachments: tuple[Attachment, ...]
    xml_candidates: tuple[bytes, ...]
    xml_charsets: tuple[str | None, ...]


def _iter_defects(part: Message) -> Iterable[str]:
    for defect in getattr(part, "defects", ())[:10]:
        name = type(defect).__name__
        yield _DEFECT_NAMES.get(name, name)


def _clean_filename(value: str | None) -> str | None:
    """Decoded, single-line base name of an attachment, or None."""
    if value is None:
        return None
    decoded, _ = _decode_words(value)
    # Bidirectional controls go: with U+202E, "\u202efdp.exe" shows as "exe.pdf" in a ticket.
    name = _collapse(decoded.translate(BIDI_CONTROLS))
    name = name.replace("\\", "/").rpartition("/")[2].strip()  # never a path
    return name[:255] or None


BIDI_CONTROLS = dict.fromkeys(
    (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
)


def _embedded_size(part: Message) -> int:
    """Approximate size of an enclosed message, from its headers, payloads and boundary lines
    (bounded walk; serialising it again could be slow or fail on hostile content)."""
    total, budget = 0, _MAX_PARTS
    stack = [part]
    while stack and budget:
        budget -= 1
        current = stack.pop()
        payload = getattr(current, "_payload", None)
        if current is not part:
            # "Name: value" CRLF per header, a blank line after them
            total += sum(len(k) + len(str(v)) + 4 for k, v in current.raw_items()) + 2
        if isinstance(payload, list):
            children = [p for p in payload if isinstance(p, Message)]
            stack.extend(children)
            boundary = current.get_boundary()
            if boundary is not None:  # CRLF "--boundary" CRLF per part, and the close line
                total += (len(boundary) + 6) * len(children) + len(boundary) + 8
                total += len(current.preamble or "") + len(current.epilogue or "")
        elif isinstance(payload, str):
            total += len(payload)
    return total


def _empty_message(defects: tuple[str, ...], *, long_lines: bool = False) -> ParsedMessage:
    return ParsedMessage(
        subject="",
        from_address="",
        from_name="",
        message_id=None,
        in_reply_to=(),
        references=(),
        auto_submitted=None,
        precedence=None,
        list_id=False,
        list_unsubscribe=False,
        auto_response_suppress=False,
        loop_header=None,
        is_auto_reply=False,
        is_delivery_report=False,
        text="",
        html_only=False,
        attachments=(),
        xml_candidates=(),
        defects=defects,
        long_lines=long_lines,
    )
