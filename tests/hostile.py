"""Hostile input for the reliability suite: hand-written malformed messages, a hypothesis-built
corpus, hostile XML documents, and a raw SMTP client that sends bytes exactly as given.

aiosmtplib rewrites line endings and dot-stuffs for the caller, which hides exactly the bytes a
smuggling or malformed-mail test needs to control; `RawSession` writes what it is told to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import re
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

CONNECTOR = "connector@localhost"
CRLF = b"\r\n"

# Replies a hostile message may get: accepted, or refused with a clear permanent/temporary code.
CLEAR_REFUSALS = frozenset({421, 451, 452, 500, 501, 550, 552, 554})


# --- a raw SMTP client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the last line's text after the code

    @property
    def queue_id(self) -> str | None:
        m = re.search(r"queued as (\S+)", self.text)
        return m.group(1) if m else None


class SessionClosed(Exception):
    """The server closed the connection before answering."""


class RawSession:
    """One SMTP session over a plain socket; every reply is read with a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: Reply | None = None

    @classmethod
    async def open(cls, port: int, *, ehlo: bool = True, timeout: float = 20.0) -> RawSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        session = cls(reader, writer)
        try:
            session.greeting = await session.reply(timeout)
            if ehlo and session.greeting.code == 220:
                await session.command(b"EHLO hostile.test", timeout)
        except BaseException:
            await session.close()
            raise
        return session

    async def reply(self, timeout: float = 20.0) -> Reply:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise SessionClosed("connection closed by the server")
                if line[3:4] != b"-":
                    text = line[4:].decode("utf-8", "replace").strip()
                    return Reply(int(line[:3]), text)

    async def command(self, line: bytes, timeout: float = 20.0) -> Reply:
        self.writer.write(line + CRLF)
        await self.writer.drain()
        return await self.reply(timeout)

    async def start_data(self, mail_from: str) -> None:
        """MAIL FROM, RCPT TO the connector and DATA, each asserted accepted (250, 250, 354)."""
        assert (await self.command(f"MAIL FROM:<{mail_from}>".encode())).code == 250
        assert (await self.command(f"RCPT TO:<{CONNECTOR}>".encode())).code == 250
        assert (await self.command(b"DATA")).code == 354

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_message(
        self,
        data: bytes,
        *,
        mail_from: str = "hostile@example.org",
        rcpts: tuple[str, ...] = (CONNECTOR,),
        timeout: float = 30.0,
    ) -> Reply:
        """MAIL, RCPT, DATA, then the message dot-stuffed on CRLF lines (as a server sees them)."""
        reply = await self.command(f"MAIL FROM:<{mail_from}>".encode(), timeout)
        if reply.code != 250:
            return reply
        accepted = 0
        for rcpt in rcpts:
            r = await self.command(f"RCPT TO:<{rcpt}>".encode(), timeout)
            accepted += r.code == 250
            if r.code != 250:
                reply = r
        if not accepted:
            await self.command(b"RSET", timeout)
            return reply
        reply = await self.command(b"DATA", timeout)
        if reply.code != 354:
            return reply
        self.writer.write(dot_stuff(data) + b".\r\n")
        await self.writer.drain()
        return await self.reply(timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency on CRLF-delimited lines; ends the data with CRLF."""
    lines = data.split(CRLF)
    stuffed = CRLF.join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return stuffed if stuffed.endswith(CRLF) or not stuffed else stuffed + CRLF


def crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (bare CR and bare LF included)."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data)


# --- hand-written specimens -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Specimen:
    name: str
    data: bytes
    accepted: bool = True  # False: a clear refusal is the right answer


def _msg(headers: list[bytes] | bytes, body: bytes = b"body\r\n") -> bytes:
    head = headers if isinstance(headers, bytes) else CRLF.join(headers) + CRLF
    return head + CRLF + body


def _nested_multipart(depth: int, *, terminated: bool = True) -> bytes:
    out = b"Subject: deep multipart\r\nMIME-Version: 1.0\r\n"
    out += b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n'
    for i in range(1, depth):
        out += f'--b{i - 1}\r\nContent-Type: multipart/mixed; boundary="b{i}"\r\n\r\n'.encode()
    out += f"--b{depth - 1}\r\nContent-Type: text/plain\r\n\r\ninnermost\r\n".encode()
    if terminated:
        for i in range(depth - 1, -1, -1):
            out += f"--b{i}--\r\n".encode()
    return out


def _nested_rfc822(depth: int) -> bytes:
    inner = b"Subject: innermost\r\nFrom: deep@example.org\r\n\r\nbottom\r\n"
    for i in range(depth):
        inner = (
            f"Subject: level {i}\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n"
        ).encode() + inner
    return inner


def _tnef() -> bytes:
    # A TNEF stream (winmail.dat): the signature, a key, then nonsense attributes.
    blob = b"\x78\x9f\x3e\x22" + b"\x01\x00" + bytes(range(256)) * 8
    b64 = base64.encodebytes(blob).replace(b"\n", CRLF)
    return _msg(
        [
            b"From: Outlook User <outlook@example.org>",
            b"Subject: Rich text from Outlook",
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/mixed; boundary="t"',
        ],
        b"--t\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        b'--t\r\nContent-Type: application/ms-tnef; name="winmail.dat"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="winmail.dat"\r\n\r\n' + b64 + b"--t--\r\n",
    )


def _multipart(parts: list[bytes], boundary: bytes = b"zz", close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + CRLF + p + CRLF for p in parts)
    if close:
        body += b"--" + boundary + b"--" + CRLF
    return _msg(
        [
            b"Subject: multipart",
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"',
        ],
        body,
    )


def hand_written() -> list[Specimen]:
    """The malformed messages of the issue, one specimen (or a few) per kind of damage."""
    s: list[Specimen] = []
    add = s.append
    add(Specimen("empty-data", b""))
    add(Specimen("no-headers-body-only", b"just a body line\r\nand another\r\n"))
    add(Specimen("headers-only-no-blank-line", b"Subject: no body\r\nFrom: a@example.org\r\n"))
    add(Specimen("blank-line-first", b"\r\nSubject: is body\r\n"))
    add(
        Specimen(
            "garbage-headers",
            b"\x01\x02\x03: \xff\xfe\r\n:::\r\nno colon at all\r\n : leading space\r\n"
            b"Sub\x00ject: nul in name\r\n\xe4\xf6\xfc: umlauts\r\n\r\nbody\r\n",
        )
    )
    add(Specimen("continuation-first", b" folded before any header\r\nSubject: x\r\n\r\nb\r\n"))
    add(
        Specimen(
            "20000-headers",
            b"".join(f"X-Header-{i}: value {i}\r\n".encode() for i in range(20_000))
            + b"Subject: many headers\r\n\r\nbody\r\n",
        )
    )
    add(
        Specimen(
            "20000-received-headers",
            b"".join(
                f"Received: from h{i}.example by h{i + 1}.example; Thu, 1 Jan 2026\r\n".encode()
                for i in range(20_000)
            )
            + b"Subject: long trace\r\n\r\nbody\r\n",
        )
    )
    add(Specimen("1mb-body-line", _msg([b"Subject: long line"], b"a" * 1_000_000 + CRLF)))
    add(Specimen("1mb-header-line", b"X-Long: " + b"h" * 1_000_000 + b"\r\n\r\nbody\r\n"))
    add(
        Specimen(
            "line-over-the-limit", _msg([b"Subject: too long"], b"a" * 1_100_000 + CRLF), False
        )
    )
    add(Specimen("200kb-subject", _msg([b"Subject: " + b"s" * 200_000])))
    add(Specimen("200kb-from", _msg([b"From: " + b"x" * 200_000 + b"@example.org"])))
    add(
        Specimen(
            "200kb-folded-subject",
            _msg([b"Subject: start" + b"".join(b"\r\n word" for _ in range(40_000))]),
        )
    )
    add(Specimen("200kb-content-type", _msg([b"Content-Type: text/plain; x=" + b"p" * 200_000])))
    add(
        Specimen(
            "10000-params",
            _msg(
                [
                    b"Content-Type: text/plain"
                    + b"".join(f"; p{i}=v".encode() for i in range(10_000))
                ]
            ),
        )
    )
    add(
        Specimen(
            "rfc2231-broken",
            _msg(
                [
                    b"MIME-Version: 1.0",
                    b"Content-Type: application/octet-stream;"
                    b" name*0*=utf-8''%ZZ%; name*2=lost; name*99999999999999=x",
                    b"Content-Disposition: attachment; filename*=bogus'xx'%FF%FE%",
                    b"Content-Transfer-Encoding: base64",
                ],
                b"AAAA\r\n",
            ),
        )
    )
    add(
        Specimen(
            "broken-base64-body",
            _msg(
                [b"MIME-Version: 1.0", b"Content-Transfer-Encoding: base64"],
                b"SGVsbG8gd29ybGQ=!!!@@@###\r\nnot base64 at all ===\r\n=\r\nQQ\r\n",
            ),
        )
    )
    add(
        Specimen(
            "broken-quoted-printable",
            _msg(
                [b"MIME-Version: 1.0", b"Content-Transfer-Encoding: quoted-printable"],
                b"bad =ZZ escape =\r\n=\r\n=4\r\nsoft break at the end=",
            ),
        )
    )
    add(
        Specimen(
            "unknown-transfer-encoding",
            _msg([b"MIME-Version: 1.0", b"Content-Transfer-Encoding: x-uuencode-ish"], b"xx\r\n"),
        )
    )
    add(
        Specimen(
            "unterminated-multipart",
            _multipart([b"Content-Type: text/plain\r\n\r\npart one"], close=False),
        )
    )
    add(
        Specimen(
            "multipart-without-boundary",
            _msg([b"MIME-Version: 1.0", b"Content-Type: multipart/mixed"], b"--\r\nx\r\n"),
        )
    )
    add(
        Specimen(
            "multipart-empty-boundary",
            _msg([b'Content-Type: multipart/mixed; boundary=""'], b"--\r\n\r\nx\r\n----\r\n"),
        )
    )
    add(Specimen("multipart-long-boundary", _multipart([b"\r\nx"], boundary=b"b" * 500)))
    add(Specimen("multipart-no-parts", _multipart([])))
    add(Specimen("multipart-3000-parts", _multipart([b"\r\np"] * 3000)))
    add(Specimen("multipart-300-deep", _nested_multipart(300)))
    add(Specimen("multipart-300-deep-unterminated", _nested_multipart(300, terminated=False)))
    add(
        Specimen(
            "multipart-same-boundary-nested",
            _msg(
                [b'Content-Type: multipart/mixed; boundary="x"'],
                b'--x\r\nContent-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\nin\r\n'
                b"--x--\r\n--x--\r\n",
            ),
        )
    )
    add(Specimen("rfc822-60-deep", _nested_rfc822(60)))
    add(Specimen("rfc822-300-deep", _nested_rfc822(300)))
    add(
        Specimen(
            "rfc822-garbage-inside",
            _msg([b"Content-Type: message/rfc822"], b"\x00\xff garbage\r\n\r\n\xfe\r\n"),
        )
    )
    add(
        Specimen(
            "rfc822-base64-encoded",
            _msg(
                [b"Content-Type: message/rfc822", b"Content-Transfer-Encoding: base64"],
                base64.b64encode(b"Subject: inner\r\n\r\nhi\r\n") + CRLF,
            ),
        )
    )
    add(
        Specimen(
            "rfc822-attachment-in-multipart",
            _multipart(
                [
                    b"Content-Type: text/plain\r\n\r\nsee forwarded",
                    b"Content-Type: message/rfc822\r\n\r\n" + _nested_multipart(20),
                ]
            ),
        )
    )
    add(Specimen("tnef-winmail-dat", _tnef()))
    for charset in (
        b"x-unknown-42",
        b"utf-7",
        b"utf-16",
        b"utf-32",
        b"rot13",
        b"hex",
        b"base64",
        b"zlib",
        b"idna",
        b"../../etc/passwd",
        b"\xff\xfe",
        b"",
        b"a" * 300,
    ):
        add(
            Specimen(
                f"charset-{charset[:20]!r}",
                _msg(
                    [
                        b"Subject: =?" + (charset or b"x") + b"?b?aGVsbG8=?=",
                        b'Content-Type: text/plain; charset="' + charset + b'"',
                    ],
                    b"caf\xe9 \xff\xfe\x00 odd bytes\r\n",
                ),
            )
        )
    add(
        Specimen(
            "lying-utf8-is-latin1",
            _msg([b"Content-Type: text/plain; charset=utf-8"], b"Gr\xfc\xdfe aus K\xf6ln\r\n"),
        )
    )
    add(
        Specimen(
            "lying-ascii-is-utf8",
            _msg([b"Content-Type: text/html; charset=us-ascii"], "<p>Grüße</p>".encode() + CRLF),
        )
    )
    add(
        Specimen(
            "lying-utf16-odd-length",
            _msg([b"Content-Type: text/plain; charset=utf-16"], b"\xff\xfeA\x00B\r\n"),
        )
    )
    add(Specimen("nul-bytes-body", _msg([b"Subject: nul"], b"a\x00b\x00\x00c\r\n" * 100)))
    add(Specimen("nul-bytes-headers", _msg([b"Subject: a\x00b", b"From: x\x00@example.org"])))
    add(
        Specimen(
            "raw-8bit-headers",
            _msg(
                [
                    "Subject: Grüße – Störung 💥".encode(),
                    b"From: J\xf6rg <j\xf6rg@example.org>",
                    "To: 用户 <用户@例子.广告>".encode(),
                ]
            ),
        )
    )
    add(
        Specimen(
            "5000-encoded-words",
            _msg([b"Subject: " + b" ".join(b"=?utf-8?b?w6TDtsO8?=" for _ in range(5000))]),
        )
    )
    add(
        Specimen(
            "5000-broken-encoded-words",
            _msg([b"Subject: " + b"".join(b"=?utf-8?q?=ZZ=?==?x?b?!!?=" for _ in range(5000))]),
        )
    )
    add(
        Specimen(
            "encoded-words-in-from",
            _msg([b"From: " + b" ".join(b"=?utf-8?b?QUFB?=" for _ in range(3000)) + b" <a@b.c>"]),
        )
    )
    add(Specimen("empty-from-to-subject", _msg([b"From:", b"To:", b"Subject:"])))
    add(Specimen("blank-from-to-subject", _msg([b"From: ", b"To:   ", b"Subject:  \t "])))
    add(Specimen("from-angle-only", _msg([b"From: <>", b"Subject: null"])))
    add(
        Specimen(
            "from-10000-addresses",
            _msg([b"From: " + b", ".join(f"u{i}@example.org".encode() for i in range(10_000))]),
        )
    )
    add(
        Specimen(
            "5000-references",
            _msg(
                [
                    b"Message-ID: <" + b"m" * 400 + b"@example.org>",
                    b"In-Reply-To: " + b" ".join(f"<r{i}@x>".encode() for i in range(5000)),
                    b"References: " + b" ".join(f"<r{i}@x>".encode() for i in range(5000)),
                ]
            ),
        )
    )
    add(Specimen("message-id-unclosed", _msg([b"Message-ID: <" + b"a" * 10_000])))
    add(Specimen("date-garbage", _msg([b"Date: the 45th of Smarch, year -1", b"Subject: d"])))
    add(Specimen("ticket-tag-huge-number", _msg([b"Subject: Re: [Ticket #99999999999999999999]"])))
    add(Specimen("ticket-tag-many", _msg([b"Subject: " + b"[Ticket #1]" * 5000])))
    add(
        Specimen(
            "alert-subject-10000-words",
            _msg(
                [
                    b"From: alerts@externalsystem.com",
                    b"Subject: Alert for Site " + b"word " * 10_000 + b", Disk C: low",
                ]
            ),
        )
    )
    add(
        Specimen(
            "html-100k-unclosed-tags",
            _msg([b"Content-Type: text/html"], b"<div><b><i>" * 30_000 + CRLF),
        )
    )
    add(
        Specimen(
            "html-huge-comment-and-script",
            _msg(
                [b"Content-Type: text/html"],
                b"<!--" + b"-" * 200_000 + b"<script>" + b"x" * 100_000 + CRLF,
            ),
        )
    )
    add(
        Specimen(
            "html-entities-flood",
            _msg([b"Content-Type: text/html"], b"&#99999999;&bogus;&#x110000;&amp" * 20_000 + CRLF),
        )
    )
    add(
        Specimen(
            "auto-submitted-weird",
            _msg([b"Auto-Submitted: \xff\x00auto-replied; " + b"x" * 5000, b"Precedence: \x00"]),
        )
    )
    add(Specimen("own-loop-header", _msg([b"X-Smtpgate-Loop: connector@localhost", b"Subject: l"])))
    add(Specimen("delivery-report-malformed", _delivery_report()))
    add(
        Specimen(
            "xml-attachment-garbage",
            _multipart(
                [
                    b"Content-Type: text/plain\r\n\r\nsee xml",
                    b'Content-Type: application/xml; name="a.xml"\r\n'
                    b"Content-Transfer-Encoding: base64\r\n\r\n!!notbase64!!",
                ]
            ),
        )
    )
    add(Specimen("dot-lines", _msg([b"Subject: dots"], b".\r\n..\r\n. .\r\n.x\r\n")))
    add(Specimen("only-crlfs", CRLF * 5000))
    add(Specimen("bare-lf-in-body", b"Subject: a\r\n\r\nline\nline\r\n", False))
    add(Specimen("bare-cr-in-header", b"Subject: a\rb\r\n\r\nline\r\n", False))
    add(Specimen("lf-only-message", b"Subject: unix\nFrom: a@b\n\nbody\n", False))
    return s


def _delivery_report() -> bytes:
    return _msg(
        [
            b"From: MAILER-DAEMON@example.org",
            b"Subject: Undelivered Mail Returned to Sender",
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="r"',
        ],
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\n\xff\xfe garbage\r\n"
        b"--r\r\nContent-Type: message/rfc822\r\n\r\n"
        b"X-Smtpgate-Loop: connector@localhost\r\nSubject: ours\r\n\r\nx\r\n--r",
    )


# --- a hypothesis-built corpus ----------------------------------------------------------------

_HEADER_NAMES = st.sampled_from(
    [
        b"From",
        b"To",
        b"Cc",
        b"Subject",
        b"Message-ID",
        b"In-Reply-To",
        b"References",
        b"Date",
        b"Content-Type",
        b"Content-Transfer-Encoding",
        b"Content-Disposition",
        b"MIME-Version",
        b"Auto-Submitted",
        b"Precedence",
        b"List-Id",
        b"X-Auto-Response-Suppress",
        b"Reply-To",
        b"Sender",
        b"X-Odd",
    ]
)
_TOKENS = st.sampled_from(
    [
        b"=?utf-8?b?w6TDtsO8?=",
        b"=?iso-8859-1?q?caf=E9?=",
        b"=?x-bogus?b?AAAA?=",
        b"=?utf-8?q?=ZZ?=",
        b"=?utf-8?b?!!!?=",
        b"=?",
        b"?=",
        b"<a@b.example>",
        b"<>",
        b"<<<",
        b'"quoted',
        b"(comment",
        b"\\",
        b"multipart/mixed; boundary=q",
        b"text/html; charset=x-unknown",
        b"text/plain; charset=utf-16",
        b"base64",
        b"quoted-printable",
        b"attachment; filename*0*=utf-8''%E4",
        b"[Ticket #12]",
        b"Alert for Site Acme Corp,",
        b"\xff\xfe",
        b"\xc3(",
        b"\x00",
        "Grüße".encode(),
        "😀".encode(),
        b"auto-replied",
        b"bulk",
        b";",
        b",",
        b":",
        b"=",
    ]
)
_WORDS = st.one_of(_TOKENS, st.binary(max_size=30).map(lambda b: crlf(b).replace(CRLF, b" ")))


@st.composite
def _header_value(draw: st.DrawFn) -> bytes:
    words = draw(st.lists(_WORDS, max_size=12))
    value = b" ".join(words)
    if draw(st.booleans()) and len(value) > 10:
        cut = draw(st.integers(1, len(value) - 1))
        value = value[:cut] + CRLF + b" " + value[cut:]  # folding in odd places
    return value


@st.composite
def _body(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["text", "base64", "qp", "multipart", "binary", "html"]))
    if kind == "text":
        return b" ".join(draw(st.lists(_WORDS, max_size=40)))
    if kind == "base64":
        payload = base64.b64encode(draw(st.binary(max_size=300)))
        damage = draw(st.binary(max_size=10))
        at = draw(st.integers(0, len(payload)))
        return payload[:at] + damage + payload[at:]
    if kind == "qp":
        return b"=".join(draw(st.lists(st.binary(max_size=8), max_size=30)))
    if kind == "html":
        tags = st.sampled_from([b"<p>", b"<div", b"</b>", b"<!--", b"-->", b"<script>", b"&#0;"])
        return b"".join(draw(st.lists(st.one_of(tags, _WORDS), max_size=40)))
    if kind == "binary":
        return draw(st.binary(max_size=400))
    boundary = draw(st.sampled_from([b"q", b"b1", b"", b"--", b"q q"]))
    parts = draw(st.lists(st.tuples(_header_value(), _WORDS), max_size=6))
    out = b""
    for ctype, text in parts:
        out += b"--" + boundary + CRLF + b"Content-Type: " + ctype + CRLF + CRLF + text + CRLF
    if draw(st.booleans()):
        out += b"--" + boundary + b"--" + CRLF
    return out


@st.composite
def hostile_message(draw: st.DrawFn) -> bytes:
    """A message of random damaged headers and body; line endings are CRLF (else: smuggling)."""
    headers = draw(st.lists(st.tuples(_HEADER_NAMES, _header_value()), max_size=15))
    head = b"".join(name + b": " + value + CRLF for name, value in headers)
    if draw(st.booleans()):
        head += b"Content-Type: " + draw(
            st.sampled_from(
                [
                    b"multipart/mixed; boundary=q",
                    b'multipart/alternative; boundary="b1"',
                    b"message/rfc822",
                    b"text/html; charset=utf-8",
                    b"application/ms-tnef",
                    b"text/xml",
                ]
            )
        )
        head += CRLF
    separator = draw(st.sampled_from([CRLF, b"", CRLF + CRLF]))
    return crlf(head + separator + draw(_body()))


def hypothesis_corpus(count: int) -> list[bytes]:
    """`count` distinct hostile messages drawn by hypothesis (derandomized: the same every run)."""
    found: dict[bytes, None] = {}

    @settings(
        max_examples=count * 3,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(hostile_message())
    def collect(message: bytes) -> None:
        if len(found) < count:
            found[message] = None

    collect()
    return list(found)


# --- hostile XML ------------------------------------------------------------------------------

_TX_OPEN = b"<CommitCRMTransaction><DataKind>TICKET</DataKind><RecordData>"
_TX_CLOSE = b"</RecordData></CommitCRMTransaction>"


def _laughs(levels: int, fanout: int) -> bytes:
    ents = [b'<!ENTITY lol0 "lol">']
    for i in range(1, levels):
        refs = b"".join(f"&lol{i - 1};".encode() for _ in range(fanout))
        ents.append(f"<!ENTITY lol{i} ".encode() + b'"' + refs + b'">')
    return (
        b'<?xml version="1.0"?>\n<!DOCTYPE CommitCRMTransaction [\n'
        + b"\n".join(ents)
        + b"\n]>\n"
        + _TX_OPEN
        + f"<FLDTKTPROBLEM>&lol{levels - 1};</FLDTKTPROBLEM>".encode()
        + _TX_CLOSE
    )


def hostile_xml() -> list[tuple[str, bytes]]:
    """XML API attacks: each must be refused (150012 or 150001), quickly and in bounded memory."""
    quad_entity = b"A" * 50_000
    return [
        (
            "xxe-file",
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            + _TX_OPEN
            + b"<FLDTKTPROBLEM>&x;</FLDTKTPROBLEM>"
            + _TX_CLOSE,
        ),
        (
            "xxe-network",
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]>'
            + _TX_OPEN
            + b"<FLDTKTPROBLEM>&x;</FLDTKTPROBLEM>"
            + _TX_CLOSE,
        ),
        (
            "xxe-parameter-entity",
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY % p SYSTEM "http://127.0.0.1:9/d">%p;]>'
            + _TX_OPEN
            + _TX_CLOSE,
        ),
        (
            "external-dtd",
            b'<?xml version="1.0"?><!DOCTYPE CommitCRMTransaction SYSTEM "file:///etc/passwd">'
            + _TX_OPEN
            + _TX_CLOSE,
        ),
        (
            "xinclude",
            _TX_OPEN + b'<x:include xmlns:x="http://www.w3.org/2001/XInclude" '
            b'href="file:///etc/passwd"/>' + _TX_CLOSE,
        ),
        ("billion-laughs", _laughs(10, 10)),
        (
            "quadratic-blowup",
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "'
            + quad_entity
            + b'">]>'
            + _TX_OPEN
            + b"<FLDTKTPROBLEM>"
            + b"&a;" * 20_000
            + b"</FLDTKTPROBLEM>"
            + _TX_CLOSE,
        ),
        (
            "deep-nesting",
            b"<CommitCRMTransaction>"
            + b"<a>" * 100_000
            + b"</a>" * 100_000
            + b"</CommitCRMTransaction>",
        ),
        (
            "deep-nesting-unclosed",
            b"<CommitCRMTransaction>" + b"<a>" * 200_000,
        ),
        (
            "huge-attribute",
            b'<CommitCRMTransaction a="' + b"x" * 900_000 + b'">' + _TX_CLOSE[-23:],
        ),
        (
            "many-attributes",
            b"<CommitCRMTransaction "
            + b" ".join(f"a{i}='v'".encode() for i in range(50_000))
            + b">"
            + _TX_CLOSE[-23:],
        ),
        ("many-elements", _TX_OPEN + b"<FLDTKTPROBLEM/>" * 50_000 + _TX_CLOSE),
        (
            "over-size-limit",
            _TX_OPEN + b"<FLDTKTPROBLEM>" + b"p" * 1_100_000 + b"</FLDTKTPROBLEM>" + _TX_CLOSE,
        ),
    ]


def as_xml_mail(name: str, xml: bytes) -> bytes:
    """The XML as a mail body (base64, so long lines are fine) with a unique Message-ID."""
    b64 = base64.encodebytes(xml).replace(b"\n", CRLF)
    return _msg(
        [
            b"From: forms@example.org",
            f"Subject: xml {name}".encode(),
            f"Message-ID: <xml-{name}@hostile.test>".encode(),
            b"MIME-Version: 1.0",
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: base64",
        ],
        b64,
    )


def corpus(generated: int) -> list[Specimen]:
    """The hand-written specimens and `generated` hypothesis-built ones."""
    specimens = hand_written()
    specimens += [Specimen(f"xml-{name}", as_xml_mail(name, xml)) for name, xml in hostile_xml()]
    specimens += [
        Specimen(f"generated-{i}", data) for i, data in enumerate(hypothesis_corpus(generated))
    ]
    return specimens


def shuffled(items: list[Specimen], seed: int = 5321) -> list[Specimen]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
