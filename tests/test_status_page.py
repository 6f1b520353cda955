"""The HTML status page at GET /, as a person sees it: rendered by headless Chromium (Debian's
`chromium`, installed by .ci/run) from the real gateway on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from smtpgate.app import Gateway
from smtpgate.http import human_age, render_page
from tests.conftest import (
    GatewayFactory,
    RecordingRelay,
    http_get,
    send,
    simple_message,
    wait_outbox,
    wait_processed,
    wait_until,
)

SUBJECT = "Printer <b>jammed</b> on floor 2"


class VisibleText(HTMLParser):
    """The text a person sees (no <head>, <style> or <script>), and the elements present."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.tags: list[str] = []
        self.ids: dict[str, str] = {}
        self._hidden = 0
        self._id_stack: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("head", "style", "script", "title"):
            self._hidden += 1
        self._id_stack.append(dict(attrs).get("id"))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("head", "style", "script", "title"):
            self._hidden -= 1
        if self._id_stack:
            self._id_stack.pop()

    def handle_data(self, data: str) -> None:
        if self._hidden <= 0:
            self.parts.append(data)
            for element_id in self._id_stack:
                if element_id:
                    self.ids[element_id] = self.ids.get(element_id, "") + data

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI installs it via .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


async def dump_dom(url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(45):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def busy_gateway(gateway_factory: GatewayFactory, relay: RecordingRelay) -> Gateway:
    """A gateway with a ticket, a forward, and a forward the relay refused for good."""
    gw = await gateway_factory()
    assert gw.store is not None
    store = gw.store
    await store.import_accounts([(2, {"file_as": "Acme Corp", "email1": "it@acme.example"})])
    code, _ = await send(
        gw.smtp_port,
        simple_message(SUBJECT, "Acme IT <it@acme.example>", message_id="<p1@acme.example>"),
        mail_from="it@acme.example",
    )
    assert code == 250
    code, _ = await send(gw.smtp_port, simple_message("Hi", message_id="<p2@example.org>"))
    assert code == 250
    await wait_processed(gw, 2)
    await relay.wait_for(1)

    async def outbox_idle() -> bool:
        s = await store.status()
        return bool(s["outbox"]["queued"] + s["outbox"]["active"] == 0)

    await wait_until(outbox_idle, what="first deliveries")
    relay.fail_with = "554 5.7.1 Relay access denied for smtpgate"
    code, _ = await send(gw.smtp_port, simple_message("Hello again", message_id="<p3@ex.org>"))
    assert code == 250
    await wait_processed(gw, 3)
    await wait_outbox(store, "dead", 1, "a dead delivery")
    return gw


@pytest.mark.slow
async def test_status_page_in_headless_chromium(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    chromium()  # skip (or fail in CI) before doing any work
    gw = await busy_gateway(gateway_factory, relay)
    dom = await dump_dom(f"http://127.0.0.1:{gw.http_port}/", tmp_path / "profile")
    page = VisibleText()
    page.feed(dom)
    text = page.text

    assert "smtpgate — queue status" in text
    # Queue depth per state, as the cards show it.
    assert page.ids["inbound-done"].strip() == "3"
    assert page.ids["inbound-queued"].strip() == "0"
    assert page.ids["inbound-dead"].strip() == "0"
    assert "Oldest queued message: none waiting" in text
    # Outbox state and the refused delivery with the relay's error.
    assert "1 dead" in page.ids["outbox-state"]
    assert "554 5.7.1 Relay access denied for smtpgate" in text
    assert "No dead messages." in text
    # The latest messages with their outcomes, and the ticket the customer mail opened.
    assert "ticket_created ticket 1" in text
    assert "forwarded (unknown_sender)" in text
    assert re.search(r"\b1 " + re.escape(SUBJECT), text), "the ticket with its description"
    # Mail-supplied text is shown as text, never as markup.
    assert "<b>jammed</b>" in text
    assert "b" not in page.tags
    assert "refreshes itself" in text


async def test_status_page_is_self_contained_and_refreshes(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await busy_gateway(gateway_factory, relay)
    code, headers, body = await http_get(gw.http_port, "/")
    assert code == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    html = body.decode()
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', html)
    # No external assets: no scripts, links, images, imports or remote URLs.
    for needle in ("<script", "<link", "<img", "<iframe", "@import", "url(", "http://", "https://"):
        assert needle not in html, needle
    assert "Printer &lt;b&gt;jammed&lt;/b&gt;" in html
    assert "<td>Acme Corp</td>" in html  # the ticket's account by name, not by rec_id
    code, headers, body = await http_get(gw.http_port, "/?refresh=1")
    assert code == 200


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0 s"), (59.9, "59 s"), (60, "1 min"), (3599, "59 min"), (3660, "1 h 1 min"),
     (90000, "1 d 1 h")],
)  # fmt: skip
def test_ages_are_shown_in_human_units(seconds: float, shown: str) -> None:
    assert human_age(seconds) == shown


def test_direction_overrides_from_mail_are_shown_not_obeyed() -> None:
    """A sender `<U+202E>moc.elgoog@example.com` read `moc.elpmaxe@google.com` in its cell, a
    subject "…<U+202E>gnp.exe" read "….exe.png": the page's cells keep no bidi control (each
    shows as U+FFFD, as attachment names lose them)."""
    status = {
        "inbound": {"queued": 0, "active": 0, "done": 1, "dead": 0, "oldest_queued_age_s": 0},
        "outbox": {"queued": 0, "active": 0, "done": 0, "dead": 0},
        "accounts": 1,
        "tickets": 1,
    }
    message = {
        "id": "MSG1",
        "received_at": "2026-11-27T10:00:00Z",
        "mail_from": "\u202emoc.elgoog@example.com",
        "state": "done",
        "outcome": None,
    }
    ticket = {
        "number": 1,
        "description": "invoice\u2067\u202egnp.exe",
        "account_name": "Acme",
        "account": "ACC1",
        "source": "email",
        "created_at": "2026-11-27T10:00:00Z",
    }
    page = render_page(status, [message], [], [], [ticket]).decode()
    for control in ("\u202e", "\u2067"):
        assert control not in page
    assert "<td>\ufffdmoc.elgoog@example.com</td>" in page
    assert "<td>invoice\ufffd\ufffdgnp.exe</td>" in page
