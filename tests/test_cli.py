"""The `smtpgate` command as operators run it: a real subprocess on a real data directory."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import io
import json
import logging
import os
import re
import resource
import shlex
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tomllib
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import smtpgate
from smtpgate.cli import main
from smtpgate.config import ConfigError, load_settings, unknown_variables
from smtpgate.mail import parse_message
from smtpgate.model import Envelope, is_bare_address
from smtpgate.store import Store, new_queue_id
from smtpgate.store.schema import MIGRATIONS
from tests.conftest import FIXTURES, GatewayFactory, RecordingRelay, send, wait_processed
from tests.hostile import RawSession, crlf

ROOT = Path(__file__).resolve().parent.parent
RMM = FIXTURES / "rmm"
SAMPLE_ENV = {
    "SMTPGATE_RULES_FILE": str(FIXTURES / "rules.toml"),
    "SMTPGATE_CONNECTOR_ADDRESSES": "connector@localhost",
    "SMTPGATE_INTERNAL_SUPPORT_ADDRESS": "support@msp.example",
    "SMTPGATE_API_ENABLED": "true",
    "SMTPGATE_API_PASSWORD": "s3cret",
    "SMTPGATE_ACKNOWLEDGE": "true",
}
OUTCOME_KEYS = {
    "path", "action", "reason", "account", "ticket", "rules_hit", "rules_missed", "error_code",
    "sent",
}  # fmt: skip
TICKET_KEYS = [
    "number", "rec_id", "account", "account_name", "description", "details", "status", "source",
    "created_at",
]  # fmt: skip


def run(
    data_dir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    piped_into: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m smtpgate ARGS` in a clean environment (no inherited SMTPGATE_*, no .env);
    its output `piped_into` a shell command (then buffered, as in a shell)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    environ.update(PYTHONPATH=str(ROOT), SMTPGATE_DATA_DIR=str(data_dir))
    environ.update(env or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    command: str | list[str] = [sys.executable, "-m", "smtpgate", *args]
    if piped_into is not None:
        environ.pop("PYTHONUNBUFFERED", None)
        command = f"{shlex.join(command)} | {piped_into}"
    return subprocess.run(
        command,
        shell=piped_into is not None,
        cwd=data_dir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=preexec_fn,
    )


def run_here(
    monkeypatch: pytest.MonkeyPatch,
    data_dir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str, str]:
    """`smtpgate.cli.main(ARGS)` in this process (fast, for the long tables); same clean env."""
    for key in [k for k in os.environ if k.startswith("SMTPGATE_")]:
        monkeypatch.delenv(key)
    for key, value in {"SMTPGATE_DATA_DIR": str(data_dir), **(env or {})}.items():
        monkeypatch.setenv(key, value)
    data_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(data_dir)  # no stray .env
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:  # main() configures logging for a process; give the test runner its own back
        root.handlers[:], root.level = handlers, level
    return code, out.getvalue(), err.getvalue()


def ok_json(data_dir: Path, *args: str, env: Mapping[str, str] | None = None) -> Any:
    result = run(data_dir, *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def dump(data_dir: Path) -> list[str]:
    """Every row of every table, for 'nothing changed' checks."""
    with sqlite3.connect(data_dir / "smtpgate.db") as db:
        return list(db.iterdump())


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- imports -------------------------------------------------------------------------------------


def test_import_before_first_serve_records_migrations_and_lists_accounts(tmp_path: Path) -> None:
    data = tmp_path / "var"
    assert not (data / "smtpgate.db").exists()
    result = run(data, "accounts", "import", str(FIXTURES / "accounts.csv"))
    assert result.returncode == 0, result.stderr
    assert "imported 2 accounts" in result.stdout
    with sqlite3.connect(data / "smtpgate.db") as db:
        versions = [v for (v,) in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m[0] for m in MIGRATIONS]
    accounts = ok_json(data, "accounts", "list")
    assert [(a["rec_id"], a["file_as"]) for a in accounts] == [
        ("CRDACME0000000000001", "Acme Corp"),
        ("CRDGLOBEX00000000002", "Globex"),
    ]
    assert accounts[0]["account_number"] == "ACME-001"
    assert all(k == k.lower() for a in accounts for k in a)


def test_reimport_updates_instead_of_duplicating(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = write(
        tmp_path / "a.csv",
        "file_as,account_number,email1\nAcme Corp,ACME-001,it@acme.example\nGlobex,GLX,\n",
    )
    assert run(data, "accounts", "import", str(first)).returncode == 0
    before = {a["file_as"]: a["rec_id"] for a in ok_json(data, "accounts", "list")}
    assert all(len(r) == 20 and r.startswith("CRD") and r[3:].isalnum() for r in before.values())
    assert all(r[3:] == r[3:].upper() for r in before.values())
    # Same file again, then a changed one matched on file_as (case-insensitive) and on rec_id.
    assert run(data, "accounts", "import", str(first)).returncode == 0
    changed = write(
        tmp_path / "b.csv",
        "rec_id,file_as,email1\n,ACME CORP,helpdesk@acme.example\n"
        f"{before['Globex']},Globex Inc,\n",
    )
    assert run(data, "accounts", "import", str(changed)).returncode == 0
    after = {a["rec_id"]: a for a in ok_json(data, "accounts", "list")}
    assert set(after) == set(before.values())
    assert after[before["Acme Corp"]]["email1"] == "helpdesk@acme.example"
    assert after[before["Globex"]]["file_as"] == "Globex Inc"
    # An update by rec_id with a blank name keeps the name.
    by_id = write(tmp_path / "c.csv", f"rec_id,file_as,account_id\n{before['Globex']},,G-9\n")
    assert run(data, "accounts", "import", str(by_id)).returncode == 0
    after = {a["rec_id"]: a for a in ok_json(data, "accounts", "list")}
    assert (after[before["Globex"]]["file_as"], after[before["Globex"]]["account_id"]) == (
        "Globex Inc",
        "G-9",
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Müller Bau", unicodedata.normalize("NFD", "Müller Bau")),  # exported again on a Mac
        ("Acme Corp", "Acme  Corp"),
        ("Müller Bau", "MÜLLER BAU"),  # NOCASE folded ASCII only
    ],
    ids=["decomposed", "doubled-space", "non-ascii-case"],
)
def test_reimport_matches_names_as_account_detection_compares_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, first: str, second: str
) -> None:
    """spec 3: the same file twice updates; spec 2.1.3 compares names case-insensitively,
    white space collapsed. The import matched with SQLite's ASCII NOCASE: the second export
    added a second account, and every alert naming it became ambiguous."""
    data = tmp_path / "var"
    for name, text in (("a", first), ("b", second)):
        csv_file = write(tmp_path / f"{name}.csv", f"file_as,account_number\n{text},M1\n")
        assert run_here(monkeypatch, data, "accounts", "import", str(csv_file))[0] == 0
    code, out, _ = run_here(monkeypatch, data, "accounts", "list", "--json")
    assert code == 0
    assert len(json.loads(out)) == 1, out
    contact = write(tmp_path / "c.csv", f"account_file_as,email\n{second},x@m.example\n")
    assert run_here(monkeypatch, data, "contacts", "import", str(contact))[0] == 0
    employees = write(tmp_path / "e.csv", f"name,email1\n{first},a@msp.example\n")
    again = write(tmp_path / "f.csv", f"name,email1\n{second},b@msp.example\n")
    assert run_here(monkeypatch, data, "employees", "import", str(employees))[0] == 0
    assert run_here(monkeypatch, data, "employees", "import", str(again))[0] == 0
    with contextlib.closing(sqlite3.connect(data / "smtpgate.db")) as db:
        assert db.execute("SELECT email1 FROM employees").fetchall() == [("b@msp.example",)]


def test_an_account_given_the_name_of_another_is_imported_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """First imported without rec_ids, then from RangerMSP's export with them: the second is a
    new account by its rec_id (spec 3), and alerts naming it find both. Said, not hidden."""
    data = tmp_path / "var"
    first = write(tmp_path / "a.csv", "file_as\nAcme Corp\n")
    assert run_here(monkeypatch, data, "accounts", "import", str(first))[0] == 0
    second = write(tmp_path / "b.csv", "rec_id,file_as\nCRD12345678901234567,ACME CORP\n")
    code, out, err = run_here(monkeypatch, data, "accounts", "import", str(second))
    assert (code, out.strip()) == (0, "imported 1 accounts")
    assert "warning: line 2: a new account CRD12345678901234567 has the name of account" in err
    assert "ambiguous" in err
    assert "without the rec_id column" in err
    again = write(tmp_path / "c.csv", "file_as,account_number\nAcme Corp,A-1\n")
    code, _, err = run_here(monkeypatch, data, "accounts", "import", str(again))
    assert (code, err) == (0, "")


@pytest.mark.parametrize(
    ("kind", "text", "line"),
    [
        ("accounts", "file_as,email1\nNew One,a@new.example\n,b@new.example\n", 3),
        ("accounts", "rec_id,email1\nCRDNEWNEWNEWNEWNEW01,a@x.example\n", 2),
        ("accounts", "file_as,email1\nNew One,a@x.example\nTwo,b@x.example,extra\n", 3),
        ("accounts", "file_as,colour\nNew One,red\n", 1),
        ("contacts", "account_file_as,name,email\nAcme Corp,J,j@acme.example\nNone,X,x@y.z\n", 3),
        ("contacts", "account_file_as,name,email\nAcme Corp,Jo,not-an-address\n", 2),
        ("employees", "name,email1,active\nDana,dana@msp.example,Y\nEve,eve@msp.example,no?\n", 3),
        ("employees", "name,email1\nDana,dana@msp.example\n,x@msp.example\n", 3),
        ("accounts", '[\n  {"file_as": "New One"},\n  {"email1": "x@y.example"}\n]\n', 3),
        ("accounts", '[\n  {"file_as": "New One"},\n\n  {"file_as": "B", "colour": "red"}\n]', 4),
        ("contacts", '[{"account_file_as": "Acme Corp", "email": "a@acme.example"},\n 5]', 2),
        # A CRM export's "Name <address>" or list matched no sender, silently.
        ("accounts", 'file_as,email1\nNew One,a@new.example\nTwo,"Jane Roe <jane@a.example>"\n', 3),
        ("accounts", 'file_as,email2\nTwo,"x@b.example; y@b.example"\n', 2),
        ("accounts", 'file_as,email2\nTwo,b example.org\n', 2),
        ("contacts", 'account_file_as,name,email\nAcme Corp,Bob,"Bob <bob@b2.example>"\n', 2),
        ("employees", 'name,email1\nDana,"Dana Tech <dana@msp.example>"\n', 2),
        ("employees", 'name,email2\nDana,"dana@msp.example, d@msp.example"\n', 2),
        # Two rows of one file for one record: the second overwrote the first, "imported 2".
        ("accounts", "file_as,email1\nNew One,a@new.example\nNEW  ONE,b@new.example\n", 3),
        ("employees", "name,email1\nChris Miller,c@msp.example\nChris Miller,cm@msp.example\n", 3),
        ("contacts", "account_file_as,email\nAcme Corp,j@a.example\nacme corp,j@a.example\n", 3),
        # spec 3: record ids have RangerMSP's shape; any text was stored.
        ("accounts", "rec_id,file_as\nCRD00000000000000001,A\nfoo,Foo\n", 3),
        ("accounts", "rec_id,file_as\nEMP12345678901234567,Foo\n", 2),
        ("employees", "rec_id,name\nemp12345678901234567,Dana\n", 2),
        # A JSON list or object as a value was stored as its Python text.
        ("accounts", '[\n  {"file_as": "A"},\n  {"file_as": {"name": "Acme"}}\n]', 3),
    ],
    ids=[
        "account-no-file_as", "account-new-rec_id-no-name", "csv-extra-value", "unknown-column",
        "contact-unknown-account", "contact-bad-email", "employee-bad-active",
        "employee-no-name", "json-no-file_as", "json-unknown-field", "json-not-object",
        "account-address-with-name", "account-two-addresses", "account-domain-with-space",
        "contact-address-with-name", "employee-address-with-name", "employee-two-addresses",
        "account-twice", "employee-twice", "contact-twice", "account-rec_id-shape",
        "account-rec_id-prefix", "employee-rec_id-lower-case", "json-nested-value",
    ],
)  # fmt: skip
def test_bad_row_names_its_line_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, loaded: Path, tmp_path: Path, kind: str, text: str, line: int
) -> None:
    data = tmp_path / "var"
    shutil.copytree(loaded, data)
    before = dump(data)
    suffix = ".json" if text.startswith("[") else ".csv"
    code, out, err = run_here(
        monkeypatch, data, kind, "import", str(write(tmp_path / f"b{suffix}", text))
    )
    assert code == 1
    assert f"line {line}" in err
    assert "nothing imported" in err
    assert "imported" not in out
    assert dump(data) == before


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with the sample accounts and employees imported (copied per test)."""
    data = tmp_path_factory.mktemp("loaded") / "var"
    assert run(data, "accounts", "import", str(FIXTURES / "accounts.csv")).returncode == 0
    assert run(data, "employees", "import", str(FIXTURES / "employees.csv")).returncode == 0
    return data


def test_json_imports_and_contacts_by_account_name(tmp_path: Path) -> None:
    data = tmp_path / "var"
    accounts = [
        {"rec_id": "CRDHOOLI000000000011", "file_as": "Hooli", "field1": "HQ", "field4": "x"},
        {"file_as": "Initech", "email2": "@initech.example"},
    ]
    path = write(tmp_path / "accounts.json", json.dumps(accounts, indent=2))
    assert run(data, "accounts", "import", str(path)).returncode == 0
    contacts = [
        {"account_file_as": "hooli", "name": "Nagios", "email": "Nagios@Hooli.example"},
        {"account_rec_id": "CRDHOOLI000000000011", "name": "Gavin", "email": "gavin@hooli.example"},
    ]
    path = write(tmp_path / "contacts.json", json.dumps(contacts))
    for _ in range(2):  # a second import updates the same contacts
        result = run(data, "contacts", "import", str(path))
        assert result.returncode == 0, result.stderr
    employees = write(tmp_path / "e.json", json.dumps([{"name": "Dana", "active": "N"}]))
    assert run(data, "employees", "import", str(employees)).returncode == 0
    with sqlite3.connect(data / "smtpgate.db") as db:
        rows = sorted(db.execute("SELECT account, email FROM contacts"))
        employee = db.execute("SELECT name, active FROM employees").fetchall()
    assert rows == [
        ("CRDHOOLI000000000011", "gavin@hooli.example"),
        ("CRDHOOLI000000000011", "nagios@hooli.example"),
    ]
    assert employee == [("Dana", 0)]
    listed = {a["file_as"]: a for a in ok_json(data, "accounts", "list")}
    assert set(listed) == {"Hooli", "Initech"}


# --- tickets, explain ----------------------------------------------------------------------------


async def cli_async(data_dir: Path, *args: str, env: Mapping[str, str] | None = None) -> Any:
    """The CLI from inside a running test loop (the gateway keeps serving meanwhile)."""
    result = await asyncio.to_thread(run, data_dir, *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_tickets_list_and_show_json(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    data = tmp_path / "data"  # the gateway fixture's data directory
    gw = await gateway_factory(
        rules=(FIXTURES / "rules.toml").read_text(), internal_support_address="support@msp.example"
    )
    imported = await asyncio.to_thread(
        run, data, "accounts", "import", str(FIXTURES / "accounts.csv")
    )
    assert imported.returncode == 0, imported.stderr
    for count, name in enumerate(("01-alert-ticket.eml", "05-customer-new.eml"), 1):
        raw = (FIXTURES / name).read_bytes()
        assert (await send(gw.smtp_port, raw))[0] == 250
        await wait_processed(gw, count)
    tickets = await cli_async(data, "tickets", "list")
    assert [list(t) for t in tickets] == [TICKET_KEYS, TICKET_KEYS]
    by_number = {t["number"]: t for t in tickets}
    assert set(by_number) == {1, 2}
    alert = by_number[1]
    assert alert["account"] == "CRDACME0000000000001"
    assert alert["account_name"] == "Acme Corp"
    assert alert["description"] == "Alert for Site Acme Corp, Disk C: low on free space"
    assert alert["details"] == "Disk C: on ACME-SRV01 has 2% free space left."
    assert (alert["status"], alert["source"]) == (100, "Email Connector (automated)")
    assert alert["rec_id"].startswith("TKT")
    assert len(alert["rec_id"]) == 20
    assert by_number[2]["source"] == "Email"
    shown = await cli_async(data, "tickets", "show", "1")
    assert {k: shown[k] for k in TICKET_KEYS} == alert
    (note,) = shown["history"]
    assert note["rec_id"].startswith("HIS")
    assert "Disk C: on ACME-SRV01 has 2% free space left." in note["description"]
    assert note["inbound_id"]
    missing = await asyncio.to_thread(run, data, "tickets", "show", "99")
    assert missing.returncode == 1
    # explain of a message already processed keeps its decision and says a resend is a duplicate
    env = {"SMTPGATE_RULES_FILE": str(FIXTURES / "rules.toml")}
    again = await cli_async(data, "explain", str(FIXTURES / "01-alert-ticket.eml"), env=env)
    assert (again["action"], again["ticket"]) == ("automated_ticket", 3)
    assert any(n.startswith(f"already processed as {note['inbound_id']}") for n in again["notes"])
    assert len(await cli_async(data, "tickets", "list")) == 2


async def test_text_output_does_not_print_control_characters_a_sender_chose(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    """The list and show verbs printed stored values raw: an ESC or BEL in a quoted local part
    of MAIL FROM, an encoded subject or a body cleared the operator's screen and retitled the
    terminal (logs escape them: cli.TextFormatter). Escaped as the logs do; lines and tabs of a
    ticket's text kept."""
    data = tmp_path / "data"
    gw = await gateway_factory(
        rules=(FIXTURES / "rules.toml").read_text(), internal_support_address="support@msp.example"
    )
    assert (
        await asyncio.to_thread(run, data, "accounts", "import", str(FIXTURES / "accounts.csv"))
    ).returncode == 0
    raw = (FIXTURES / "01-alert-ticket.eml").read_bytes()
    raw = raw.replace(b"free space\n", b"free space =?utf-8?q?=1B]0;pwned=07?=\n", 1)
    raw = crlf(raw.replace(b"left.", "left.\x1b[2J\n\tsecond\x9b1m line".encode(), 1))
    session = await RawSession.open(gw.smtp_port)
    reply = await session.send_message(raw, mail_from='"\x1b]0;pwned\x07"@x.example')
    await session.close()
    assert reply.code == 250, reply
    await wait_processed(gw, 1)
    outputs = {}
    for verb in (
        ("queue", "list"),
        ("tickets", "list"),
        ("tickets", "show", "1"),
        ("outbox", "list"),
    ):
        result = await asyncio.to_thread(run, data, *verb)
        assert result.returncode == 0, result.stderr
        outputs[verb] = result.stdout
    assert "pwned" in outputs["queue", "list"]
    assert "pwned" in outputs["tickets", "list"]
    for verb, text in outputs.items():
        assert not any(c in text for c in "\x1b\x07\x9b"), (verb, text)
    shown = outputs["tickets", "show", "1"]
    assert "left.[2J\n\tsecond\\x9b1m line" in shown, shown  # (the parser drops C0 controls)


async def test_json_output_escapes_the_controls_a_sender_chose(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    """`queue show` is always JSON and read on a terminal: a C1 control (U+009B, CSI) and a
    bidi override (U+202E) in an SMTPUTF8 sender reached it raw (JSON escapes only C0). Every
    JSON view now escapes what the text views do; the parsed values are unchanged."""
    data = tmp_path / "data"
    gw = await gateway_factory()
    raw = crlf(b"From: a@b.example\nTo: connector@localhost\nSubject: hi\n\nbody\n")
    sender = '"\u009b2J\u202emoc.elgoog\u00a0\U0001f600"@x.example'
    session = await RawSession.open(gw.smtp_port)
    reply = await session.send_message(raw, mail_from=sender)
    await session.close()
    assert reply.code == 250, reply
    await wait_processed(gw, 1)
    for verb in (("queue", "show", str(reply.queue_id)), ("queue", "list", "--json")):
        result = await asyncio.to_thread(run, data, *verb)
        assert result.returncode == 0, result.stderr
        assert not any(c in result.stdout for c in "\u009b\u202e\u00a0"), (verb, result.stdout)
        assert "\\u009b2J\\u202emoc" in result.stdout, result.stdout
        assert "\U0001f600" in result.stdout  # printable non-ASCII stays readable
        parsed = json.loads(result.stdout)
        row = parsed if verb[1] == "show" else parsed[0]
        assert row["mail_from"].startswith("\u009b2J\u202emoc.elgoog\u00a0\U0001f600")


@pytest.mark.parametrize(
    "args",
    [
        ("queue", "show", "MWZ\udce9"),  # a byte that is not UTF-8, as the shell passes it
        ("queue", "retry", "MWZ\udce9"),
        ("outbox", "retry", str(2**64)),
    ],
    ids=["show-non-utf8", "retry-non-utf8", "outbox-id-too-big"],
)
def test_an_id_no_row_can_have_is_a_usage_error_not_a_traceback(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A queue id that is not UTF-8 reached SQLite (UnicodeEncodeError), an outbox id past
    SQLite's integers too (OverflowError): tracebacks, where other unknown ids get one line."""
    data = tmp_path / "var"
    csv = tmp_path / "a.csv"
    csv.write_text("file_as\nAcme\n", encoding="utf-8")
    assert run(data, "accounts", "import", str(csv)).returncode == 0  # makes the store
    result = run(data, *args)
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert result.returncode == 2, result.stderr
    assert "not a queue id" in result.stderr or "not an outbox id" in result.stderr


def test_explain_json_writes_nothing_and_matches_the_spec_table(tmp_path: Path) -> None:
    data = tmp_path / "var"
    for kind in ("accounts", "employees"):
        assert run(data, kind, "import", str(FIXTURES / f"{kind}.csv")).returncode == 0
    before = dump(data)
    status = ok_json(data, "status", env=SAMPLE_ENV)
    expected = tomllib.loads((FIXTURES / "expected.toml").read_text())["messages"]
    names = ["01-alert-ticket.eml", "02-alert-self-healed.eml", "03-alert-unknown-site.eml",
             "04-xml-new-ticket.eml", "05-customer-new.eml", "07-stranger.eml",
             "08-out-of-office.eml"]  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda n: run(data, "explain", str(FIXTURES / n), "--json", env=SAMPLE_ENV), names
            )
        )
    for name, result in zip(names, results, strict=True):
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert set(outcome) >= OUTCOME_KEYS, name
        row = expected[name]
        assert (outcome["path"], outcome["action"]) == (row["path"], row["action"]), name
        assert outcome["reason"] == row.get("reason"), name
        if "account" in row:
            assert outcome["account"] == row["account"], name
        targets = [row[k] for k in ("forwarded_to", "response_to", "acknowledged_to") if k in row]
        assert [to for m in outcome["sent"] for to in m["to"]] == targets, name
    first = json.loads(results[0].stdout)
    assert first["ticket"] == 1  # the number it would get
    assert first["rules_hit"] == ["detection[1]", "account[1]"]
    assert first["rules_missed"] == ["skip[1]"]
    # Nothing was written: every table is as it was, and so are the queue and outbox counts.
    assert dump(data) == before
    assert ok_json(data, "status", env=SAMPLE_ENV) == status
    text = run(data, "explain", str(FIXTURES / "03-alert-unknown-site.eml"), env=SAMPLE_ENV)
    assert "automated_no_account" in text.stdout
    assert "would send forward to support@msp.example" in text.stdout


def test_explain_agrees_with_the_rmm_golden_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = tmp_path / "var"
    for kind in ("accounts", "contacts"):
        assert run_here(monkeypatch, data, kind, "import", str(RMM / f"{kind}.csv"))[0] == 0
    env = {
        "SMTPGATE_RULES_FILE": str(RMM / "rules.toml"),
        "SMTPGATE_INTERNAL_SUPPORT_ADDRESS": "support@msp.example",
        "SMTPGATE_SKIP_FORWARD_ADDRESS": "noc-archive@msp.example",
    }
    expected = tomllib.loads((RMM / "expected.toml").read_text())["messages"]
    # Duplicates depend on what was processed before; explain looks at one message alone.
    names = sorted(n for n, row in expected.items() if row["action"] != "duplicate")
    before = dump(data)
    for name in names:
        code, out, err = run_here(monkeypatch, data, "explain", str(RMM / name), "--json", env=env)
        assert code == 0, (name, err)
        outcome, row = json.loads(out), expected[name]
        got = (outcome["path"], outcome["action"], outcome["reason"], outcome["account"])
        assert got == (row["path"], row["action"], row.get("reason"), row.get("account")), name
        if "rule" in row:
            assert row["rule"] in outcome["rules_hit"], name
    assert dump(data) == before


@pytest.mark.parametrize(
    ("head", "action", "note"),
    [
        # A mailbox's saved copy: the delivering server wrote the envelope sender.
        ("Return-Path: <alerts@externalsystem.com>\r\n", "automated_ticket", False),
        ("From: alerts@externalsystem.com\r\n", "automated_ticket", False),
        # Neither: explained as a bounce (null sender), and said so.
        ("", "forwarded", True),
    ],
    ids=["return-path", "from", "neither"],
)
def test_explain_takes_the_envelope_sender_from_the_saved_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, head: str, action: str, note: bool
) -> None:
    """A message without From: went the automated way when processed (the envelope sender
    matched the detection rule) but explain took it for a bounce."""
    data = tmp_path / "var"
    assert run_here(monkeypatch, data, "accounts", "import", str(FIXTURES / "accounts.csv"))[0] == 0
    eml = tmp_path / "alert.eml"
    eml.write_bytes(
        f"{head}Subject: Alert for Site Acme Corp, Disk C: low\r\n\r\nC: 2%\r\n".encode()
    )
    env = {"SMTPGATE_RULES_FILE": str(FIXTURES / "rules.toml")}
    code, out, err = run_here(monkeypatch, data, "explain", str(eml), env=env)
    assert code == 0, err
    assert f"action:  {action}" in out
    assert ("explained as from the null sender" in out) is note


# --- rules ---------------------------------------------------------------------------------------


def test_rules_json_in_evaluation_order(tmp_path: Path) -> None:
    rules = ok_json(tmp_path / "var", "rules", env={"SMTPGATE_RULES_FILE": str(RMM / "rules.toml")})
    assert [s["stage"] for s in rules["stages"]] == [
        "loop", "automated", "xml", "ticket_reply", "auto_reply", "known_sender", "unknown_sender",
    ]  # fmt: skip
    assert [s["enabled"] for s in rules["stages"]][1:3] == [True, False]
    assert rules["account_by_sender"] is True
    assert [r["name"] for r in rules["detection"]] == [
        "n-central", "datto-rmm", "cw-automate", "prtg", "veeam", "ninjaone", "auvik", "zabbix",
        "nagios", "solarwinds",
    ]  # fmt: skip
    assert [r["name"] for r in rules["skip"]][:2] == ["n-central-normal", "veeam-success"]
    account = rules["account"]
    assert [r["name"] for r in account][:3] == ["auvik-rec-id", "n-central-customer",
                                                "datto-site-uid"]  # fmt: skip
    assert account[5] == {
        "name": "automate-client-name", "search": "file_as", "after": None, "before": "\\",
    }  # fmt: skip
    assert account[-1]["before"] == " - "  # a phrase keeps its spaces
    assert rules["detection"][4]["sender"] == [
        "@cyberdyne.example", "@contoso.example", "veeam@wayne.example",
    ]  # fmt: skip
    # Unnamed rules get kind[index] names, 1-based, in file order.
    spec = ok_json(
        tmp_path / "v2", "rules", env={"SMTPGATE_RULES_FILE": str(FIXTURES / "rules.toml")}
    )
    assert [r["name"] for r in spec["detection"] + spec["skip"] + spec["account"]] == [
        "detection[1]", "skip[1]", "account[1]",
    ]  # fmt: skip
    text = run(tmp_path / "var", "rules", env={"SMTPGATE_RULES_FILE": str(RMM / "rules.toml")})
    lines = text.stdout.splitlines()
    stages = [ln.split()[1] for ln in lines if ln[:5].strip().rstrip(".").isdigit()]
    assert stages[:3] == ["loop", "automated", "xml"]
    assert [ln.split(":")[0].strip() for ln in lines if ln.startswith("  n-central")] == [
        "n-central", "n-central-normal", "n-central-customer",
    ]  # fmt: skip
    # Every setting of the file is shown, not only the rules (ticket_tag and the quote patterns
    # were in --json alone).
    assert 'ticket_tag = "Ticket"' in lines
    assert sum(ln.startswith("quote_patterns[") for ln in lines) == len(spec["quote_patterns"])


RULE_ERRORS = [
    ("unknown-key", '[[detection]]\nsubject = "Alert"\nsendr = ["a@b.example"]\n', 3,
     ("detection[1]", "sendr")),
    ("unknown-key-named", '[[detection]]\nname = "datto"\nsubject = "A"\ncolour = 1\n', 4,
     ("datto", "colour")),
    ("wrong-type", '[[skip]]\nsubject = "x"\n[[skip]]\nsubject = 5\n', 4, ("skip[2]", "subject")),
    ("unknown-search", '[[account]]\nafter = "Site"\nsearch = "email"\n', 3,
     ("account[1]", "search", "file_as")),
    ("neither-condition", 'account_by_sender = true\n\n[[detection]]\nname = "empty"\n', 3,
     ("empty", "sender", "subject")),
    ("account-no-location", '[[account]]\nsearch = "rec_id"\n', 1,
     ("account[1]", "after", "before")),
    ("bad-sender", '[[detection]]\nsender = ["not an address"]\n', 2, ("detection[1]", "sender")),
    ("bad-regex", 'quote_patterns = ["(unclosed"]\n', 1, ("quote_patterns[1]: not a valid regex",)),
    ("unknown-top-level", 'account_by_sender = true\nacount_by_sender = true\n', 2,
     ("acount_by_sender",)),
    ("unknown-table", '[[detection]]\nsubject = "A"\n\n[[acount]]\nsearch = "file_as"\n', 4,
     ("acount",)),
    ("bad-toml", '[[detection]\nsubject = "A"\n', 1, ("not valid TOML",)),
    # found at the subject's first space, whatever the subject
    ("blank-phrase", '[[account]]\nsearch = "file_as"\nafter = "   "\n', 3,
     ("account[1]", "after", "white space")),
    ("domain-without-a-name", '[[detection]]\nsender = ["@"]\n', 2, ("detection[1]", "'@'")),
    ("yes-is-not-true", 'account_by_sender = "yes"\n', 1, ("account_by_sender", "boolean")),
    ("name-used-twice", '[[detection]]\nname = "a"\nsubject = "A"\n[[skip]]\nsubject = "B"\n'
     'name = "a"\n', 6, ("skip[1]", "'a'", "more than once")),
    ("built-in-step-name", '[[account]]\nsearch = "file_as"\nname = "known_sender"\n'
     'after = "Site"\n', 3, ("account[1]", "'known_sender'", "built-in step")),
    # Named the array's first line, the rule's first line, or no line at all:
    ("bad-regex-one-a-line", 'account_by_sender = true\n\nquote_patterns = [\n  "^On .+ wrote:$",'
     '  # a comment, "x"\n  \'^-----Original\',\n  "(bad",\n]\n', 6,
     ("quote_patterns[3]: not a valid regex",)),
    ("sub-table-of-a-rule", '[[account]]\nsearch = "file_as"\nafter = "x"\n[account.extra]\n'
     'foo = 1\n', 4, ("account[1]", "extra")),
    ("inline-table-rules", 'detection = [\n  { subject = "a" },\n'
     '  { subject = "b", sender = "bad" },\n]\n', 3, ("detection[2]", "sender")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "line", "words"), [c[1:] for c in RULE_ERRORS], ids=[c[0] for c in RULE_ERRORS]
)
def test_rules_file_errors_name_rule_key_and_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, line: int, words: tuple[str, ...]
) -> None:
    path = write(tmp_path / "rules.toml", text)
    env = {"SMTPGATE_RULES_FILE": str(path)}
    code, out, message = run_here(monkeypatch, tmp_path / "var", "rules", env=env)
    assert code == 2
    assert out == ""
    assert f"rules.toml:{line}" in message or f"line {line}" in message
    for word in words:
        assert word in message


def test_rules_text_shows_the_tag_and_quote_patterns_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """They were printed as JSON's ASCII escapes ("\\u0417\\u0430…"), which an operator
    checking what is in force cannot read."""
    rules = write(
        tmp_path / "rules.toml",
        'ticket_tag = "Заявка"\nquote_patterns = ["^Ursprüngliche Nachricht$"]\n',
    )
    env = {"SMTPGATE_RULES_FILE": str(rules)}
    code, out, err = run_here(monkeypatch, tmp_path / "var", "rules", env=env)
    assert code == 0, err
    assert 'ticket_tag = "Заявка"' in out, out
    assert 'quote_patterns[0] = "^Ursprüngliche Nachricht$"' in out, out
    # The step before the stages, which the table does not hold, is said too (spec 2.4).
    assert "processed before" in out.split("1. loop")[1].split("account_by_sender")[0], out


def test_rule_names_are_unique_and_a_bom_is_no_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Outcomes, explain and /metrics report rules by name: two of one name would be one."""
    twice = '[[detection]]\nname = "prtg"\nsubject = "A"\n[[skip]]\nname = "prtg"\nsubject = "B"\n'
    env = {"SMTPGATE_RULES_FILE": str(write(tmp_path / "rules.toml", twice))}
    code, _, message = run_here(monkeypatch, tmp_path / "var", "rules", env=env)
    assert code == 2
    assert "'prtg' is used more than once" in message
    # Nor may a rule take the name of a built-in step that outcomes report beside rules.
    builtin = '[[account]]\nname = "known_sender"\nsearch = "file_as"\nafter = "Site"\n'
    env = {"SMTPGATE_RULES_FILE": str(write(tmp_path / "rules.toml", builtin))}
    code, _, message = run_here(monkeypatch, tmp_path / "var", "rules", env=env)
    assert code == 2
    assert "'known_sender' is the name of a built-in step" in message
    # Older Windows editors save UTF-8 with a byte order mark: still the same rules.
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "rules.toml").read_bytes())
    env = {"SMTPGATE_RULES_FILE": str(bom)}
    code, out, message = run_here(monkeypatch, tmp_path / "var", "rules", "--json", env=env)
    assert code == 0, message
    assert [r["name"] for r in json.loads(out)["detection"]] == ["detection[1]"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SMTPGATE_SMTP_PORT", "not-a-port"),
        ("SMTPGATE_SMTP_PORT", "70000"),
        ("SMTPGATE_CONNECTOR_ADDRESSES", "connector"),
        ("SMTPGATE_INTERNAL_SUPPORT_ADDRESS", "connector@localhost"),
        ("SMTPGATE_SKIP_FORWARD_ADDRESS", "Connector@Localhost"),
        ("SMTPGATE_RELAY_TLS", "sometimes"),
        ("SMTPGATE_AUTOMATED_ENABLED", "perhaps"),
        ("SMTPGATE_RETRY_SCHEDULE", "60,-1"),
        ("SMTPGATE_HOSTNAME", "mail gw"),
        ("SMTPGATE_HOSTNAME", "bücher.example"),
        # Empty values that changed meaning: no forward target (every forward went dead), a
        # listener on every interface, a relay nowhere.
        ("SMTPGATE_INTERNAL_SUPPORT_ADDRESS", ""),
        ("SMTPGATE_HTTP_HOST", ""),
        ("SMTPGATE_SMTP_HOST", " "),
        ("SMTPGATE_RELAY_HOST", ""),
        # host:port, the commonest relay mistake: it failed at the first delivery, not here.
        ("SMTPGATE_RELAY_HOST", "smtp.example.com:587"),
        ("SMTPGATE_RELAY_HOST", "192.0.2.1:25"),
        # A URL or two hosts failed at every delivery, for SMTPGATE_RETRY_MAX_AGE.
        ("SMTPGATE_RELAY_HOST", "smtp://mail.example.com"),
        ("SMTPGATE_RELAY_HOST", "mail.example.com smtp2.example.com"),
        ("SMTPGATE_RELAY_HOST", "mail.example.com,smtp2.example.com"),
        # (A connector address with the DNS root's dot is taken without it: not refused.)
        ("SMTPGATE_INTERNAL_SUPPORT_ADDRESS", "connector@localhost."),
        # A misspelled setting was ignored (here: the gateway refused all mail).
        ("SMTPGATE_CONNECTOR_ADDRESS", "tickets@msp.example"),
    ],
)
def test_invalid_setting_names_the_variable_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str
) -> None:
    # Every verb but `status` (which reads only SMTPGATE_DATA_DIR) validates every setting.
    code, out, err = run_here(
        monkeypatch, tmp_path / "var", "tickets", "list", env={variable: value}
    )
    assert code == 2
    assert out == ""
    assert variable in err


def test_hosts_and_addresses_written_with_brackets_or_the_roots_dot_are_taken_plain(
    tmp_path: Path,
) -> None:
    """`[::1]` as a relay host (the way the ready line writes an IPv6 address) went to the
    resolver with its brackets: every delivery failed, after start-up had called it loopback.
    A connector address ending in the DNS root's dot started, and then every RCPT to it was
    refused 550."""
    settings = load_settings(
        _env_file=None,
        data_dir=tmp_path,
        relay_host="[::1]",
        smtp_host="[::1]",
        connector_addresses="Helpdesk@Example.com.",
        internal_support_address="support@msp.example.",
    )
    assert (settings.relay_host, settings.smtp_host) == ("::1", "::1")
    assert settings.connector_addresses == ("helpdesk@example.com",)
    assert settings.is_connector("helpdesk@example.com")
    assert settings.internal_support_address == "support@msp.example"


def test_an_api_password_with_outer_white_space_stops_start_up_when_the_api_is_on(
    tmp_path: Path,
) -> None:
    """<Password> is read without its surrounding white space: a secret with a trailing
    newline could never match, and every transaction was refused without an answer."""
    with pytest.raises(ConfigError, match="SMTPGATE_API_PASSWORD"):
        load_settings(_env_file=None, data_dir=tmp_path, api_enabled=True, api_password="s3cret\n")
    off = load_settings(_env_file=None, data_dir=tmp_path, api_password="s3cret\n")
    assert off.api_enabled is False  # not used: no reason to refuse to start


def test_an_empty_api_password_stops_start_up_when_the_api_is_on(tmp_path: Path) -> None:
    """SMTPGATE_API_PASSWORD= (a blank line in an env file, a compose variable not set) meant
    no password: anyone could change records by mail. Unset, it still means none (spec 2.2)."""
    with pytest.raises(ConfigError, match="SMTPGATE_API_PASSWORD is empty"):
        load_settings(_env_file=None, data_dir=tmp_path, api_enabled=True, api_password="")
    unset = load_settings(_env_file=None, data_dir=tmp_path, api_enabled=True)
    assert unset.api_password is None


def test_relay_credentials_are_both_given_or_neither(tmp_path: Path) -> None:
    """A user with an empty password (compose's ${VAR:-}) started, and every delivery sent
    AUTH PLAIN with an empty password; both empty is no AUTH, and no TLS complaint."""
    for auth in ({"relay_username": "gw", "relay_password": ""},
                 {"relay_username": "", "relay_password": "pw"},
                 {"relay_username": "gw"}):  # fmt: skip
        with pytest.raises(
            ConfigError, match="SMTPGATE_RELAY_USERNAME and SMTPGATE_RELAY_PASSWORD"
        ):
            load_settings(_env_file=None, data_dir=tmp_path, relay_tls="tls", **auth)
    none = load_settings(
        _env_file=None,
        data_dir=tmp_path,
        relay_host="smtp.msp.example",
        relay_username=" ",
        relay_password="",
    )
    assert (none.relay_username, none.relay_password) == (None, None)
    assert load_settings(_env_file=None, data_dir=tmp_path, relay_host="::1").relay_host == "::1"


def test_a_relay_password_never_crosses_the_network_in_clear_text(tmp_path: Path) -> None:
    """AUTH over SMTPGATE_RELAY_TLS=none sent the password readable to anyone on the path
    (Postfix refuses plaintext SASL without TLS by default); a relay on this host may."""
    auth = {"relay_username": "gw", "relay_password": "pw"}
    with pytest.raises(ConfigError, match="SMTPGATE_RELAY_TLS"):
        load_settings(_env_file=None, data_dir=tmp_path, relay_host="smtp.msp.example", **auth)
    for host in ("127.0.0.1", "localhost", "::1"):
        load_settings(_env_file=None, data_dir=tmp_path, relay_host=host, **auth)
    load_settings(
        _env_file=None, data_dir=tmp_path, relay_host="smtp.msp.example", relay_tls="tls", **auth
    )


def test_a_misspelled_setting_names_the_one_it_may_mean(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, _, err = run_here(
        monkeypatch,
        tmp_path / "var",
        "tickets",
        "list",
        env={"SMTPGATE_CONNECTOR_ADDRESS": "t@msp.example", "smtpgate_workerz": "8"},
    )
    assert code == 2
    assert "unknown setting SMTPGATE_CONNECTOR_ADDRESS" in err
    assert "did you mean SMTPGATE_CONNECTOR_ADDRESSES?" in err
    assert "unknown setting smtpgate_workerz (did you mean SMTPGATE_WORKERS?)" in err


def test_a_misspelled_setting_in_the_env_file_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pydantic-settings ignores a .env name that is no setting: the typo the environment
    check catches went unnoticed there, and the gateway refused all mail."""
    data = tmp_path / "var"
    data.mkdir()
    (data / ".env").write_text("SMTPGATE_CONNECTOR_ADDRESS=helpdesk@support.example\n")
    code, _, err = run_here(monkeypatch, data, "tickets", "list")
    assert code == 2
    assert (
        "unknown setting SMTPGATE_CONNECTOR_ADDRESS in .env"
        " (did you mean SMTPGATE_CONNECTOR_ADDRESSES?)" in err
    )
    (data / ".env").write_text("SMTPGATE_CONNECTOR_ADDRESSES=helpdesk@support.example\n")
    code, _, err = run_here(monkeypatch, data, "tickets", "list")
    assert "unknown setting" not in err
    assert code == 1  # no store here yet: the settings were taken
    assert "no store at" in err


def test_choices_are_taken_in_any_case(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As SMTPGATE_LOG_LEVEL is: JSON, STARTTLS."""
    monkeypatch.setenv("SMTPGATE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("SMTPGATE_RELAY_TLS", "StartTLS")
    settings = load_settings(_env_file=None, data_dir=tmp_path)
    assert (settings.log_format, settings.relay_tls) == ("json", "starttls")


def test_variables_a_platform_sets_for_a_service_named_smtpgate_are_no_settings() -> None:
    """Kubernetes gives every pod variables for a service named smtpgate, Docker's links for
    a linked container: they must not stop start-up."""
    platform = {
        "SMTPGATE_SERVICE_HOST": "10.0.0.7",
        "SMTPGATE_SERVICE_PORT": "25",
        "SMTPGATE_SERVICE_PORT_SMTP": "25",
        "SMTPGATE_PORT": "tcp://10.0.0.7:25",
        "SMTPGATE_PORT_25_TCP": "tcp://10.0.0.7:25",
        "SMTPGATE_PORT_25_TCP_ADDR": "10.0.0.7",
        "SMTPGATE_PORT_8025_TCP_PROTO": "tcp",
        "SMTPGATE_NAME": "/web/smtpgate",
        "SMTPGATE_ENV_SMTPGATE_DATA_DIR": "/var/lib/smtpgate",
    }
    assert unknown_variables(platform) == []
    assert unknown_variables({**platform, "SMTPGATE_PORTS": "25"}) == [
        "unknown setting SMTPGATE_PORTS (did you mean SMTPGATE_SMTP_PORT?)"
    ]


def test_a_write_while_another_process_holds_the_lock_is_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "var"
    assert run(data, "accounts", "import", str(FIXTURES / "accounts.csv")).returncode == 0
    with contextlib.closing(sqlite3.connect(data / "smtpgate.db", isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")  # what a running 200,000-row import holds for ~18 s
        result = run(data, "queue", "retry", "--dead")
        db.execute("ROLLBACK")
    assert "Traceback" not in result.stderr, result.stderr[-300:]
    assert result.returncode == 1
    assert "is locked by another process" in result.stderr


def test_a_retry_that_requeues_nothing_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A named message that is not dead is an error (1). `retry --dead` with nothing dead did
    all it was asked (a job's failure alert must not fire on a healthy queue): 0."""
    data = tmp_path / "var"
    assert run_here(monkeypatch, data, "accounts", "import", str(FIXTURES / "accounts.csv"))[0] == 0
    code, out, err = run_here(monkeypatch, data, "queue", "retry", "MSGNOSUCHONE1")
    assert (code, out) == (1, "requeued 0 message(s)\n")
    assert "MSGNOSUCHONE1 is not dead, or there is no such id" in err
    for verb, noun in (("outbox", "delivery(ies)"), ("queue", "message(s)")):
        code, out, err = run_here(monkeypatch, data, verb, "retry", "--dead")
        assert (code, out, err) == (0, f"requeued 0 {noun}\n", "")


def test_a_list_cut_at_its_limit_says_so_on_stderr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`accounts list --json > export.json` silently stopped at 1,000 accounts: a list cut at
    its --limit says so on stderr (stdout stays the rows, one JSON array with --json)."""
    data = tmp_path / "var"
    csv = tmp_path / "accounts.csv"
    csv.write_text(
        "rec_id,file_as\n" + "".join(f"CRD{n:017},Account {n}\n" for n in range(5)),
        encoding="utf-8",
    )
    assert run_here(monkeypatch, data, "accounts", "import", str(csv))[0] == 0
    code, out, err = run_here(monkeypatch, data, "accounts", "list", "--limit", "3", "--json")
    assert code == 0
    assert len(json.loads(out)) == 3
    assert "the first 3 accounts shown; --limit N shows more" in err
    code, out, err = run_here(monkeypatch, data, "accounts", "list", "--limit", "5", "--json")
    assert (code, len(json.loads(out)), err) == (0, 5, "")
    code, out, err = run_here(monkeypatch, data, "accounts", "list", "--limit", str(2**63 - 1))
    assert (code, len(out.splitlines()), err) == (0, 5, "")
    for verb in (("outbox", "list"), ("tickets", "list")):
        code, out, err = run_here(monkeypatch, data, *verb, "--limit", "1")
        assert (code, out, err) == (0, "", ""), verb  # nothing there: nothing cut
    asyncio.run(_two_queued(data))
    code, out, err = run_here(monkeypatch, data, "queue", "list", "--limit", "1")
    assert (code, len(out.splitlines())) == (0, 1)
    assert "the first 1 messages shown" in err
    code, out, err = run_here(monkeypatch, data, "queue", "list", "--limit", "2")
    assert (code, len(out.splitlines()), err) == (0, 2, "")


async def _two_queued(data: Path) -> None:
    store = await Store.open(data / "smtpgate.db")
    try:
        env = Envelope("127.0.0.1", "h", "a@example.org", ("connector@localhost",))
        for n in range(2):
            await store.enqueue(env, b"Subject: %d\r\n\r\nx\r\n" % n, None, new_queue_id())
    finally:
        await store.close()


@pytest.mark.parametrize("limit", [300 * 1024, 1500 * 1024], ids=["at-open", "in-the-import"])
def test_a_store_that_cannot_grow_is_one_clear_line(tmp_path: Path, limit: int) -> None:
    """A full disk (here a file size limit) ended in a traceback, or, while the store was made,
    in "cannot rollback - no transaction is active", which hid the cause."""
    rows = "".join(
        f"CRD{i:017d},Customer {i} of a long list padded out a bit\n" for i in range(20000)
    )
    (tmp_path / "many.csv").write_text("rec_id,file_as\n" + rows)

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    many = str(tmp_path / "many.csv")
    result = run(tmp_path / "var", "accounts", "import", many, preexec_fn=file_size_limit)
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert "disk I/O error" in result.stderr
    assert "cannot rollback" not in result.stderr
    assert result.returncode in (1, 2)


def test_output_piped_into_a_reader_that_stops_early_is_no_error(tmp_path: Path) -> None:
    """`smtpgate accounts list | head`: a BrokenPipeError traceback (twice: at the write and
    at the interpreter's last flush)."""
    data = tmp_path / "var"
    rows = "".join(f"CRD{i:017d},Customer number {i} of a long list\n" for i in range(3000))
    (tmp_path / "many.csv").write_text("rec_id,file_as\n" + rows)
    assert run(data, "accounts", "import", str(tmp_path / "many.csv")).returncode == 0
    result = run(data, "accounts", "list", "--limit", "5000", piped_into="head -c 10")
    assert len(result.stdout) == 10
    assert result.stderr == ""


def test_a_backup_where_it_cannot_write_is_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "var"
    assert run(data, "accounts", "import", str(FIXTURES / "accounts.csv")).returncode == 0
    result = run(data, "backup", "/proc/self/smtpgate-backup.db")  # no one may create files here
    assert "Traceback" not in result.stderr, result.stderr[-300:]
    assert result.returncode == 1
    assert "smtpgate backup: cannot write /proc/self/smtpgate-backup.db" in result.stderr


def test_reimporting_contacts_without_an_address_does_not_duplicate_them(tmp_path: Path) -> None:
    """spec 3: importing the same file twice updates rather than duplicates; a contact with
    neither rec_id nor address is the one of that name on the account."""
    data = tmp_path / "var"
    assert run(data, "accounts", "import", str(FIXTURES / "accounts.csv")).returncode == 0
    contacts = write(
        tmp_path / "contacts.csv",
        "account_file_as,name,email\nAcme Corp,Jane Doe,\nAcme Corp,Joe Bloggs,\n",
    )
    for _ in range(2):
        result = run(data, "contacts", "import", str(contacts))
        assert result.returncode == 0, result.stderr
    with contextlib.closing(sqlite3.connect(data / "smtpgate.db")) as db:
        names = sorted(n for (n,) in db.execute("SELECT name FROM contacts"))
    assert names == ["Jane Doe", "Joe Bloggs"]


def test_an_internationalized_connector_in_another_spelling_is_still_a_mail_loop(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="SMTPGATE_INTERNAL_SUPPORT_ADDRESS"):
        load_settings(
            _env_file=None,
            data_dir=tmp_path,
            connector_addresses="tickets@bücher.example",
            internal_support_address="Tickets@xn--bcher-kva.example",
        )


def test_invalid_setting_from_a_real_process_exits_2(tmp_path: Path) -> None:
    result = run(tmp_path / "var", "queue", "list", env={"SMTPGATE_WORKERS": "0"})
    assert result.returncode == 2
    assert "SMTPGATE_WORKERS" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_rules_file_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {"SMTPGATE_RULES_FILE": str(tmp_path / "no")}
    code, _, err = run_here(monkeypatch, tmp_path / "var", "rules", env=env)
    assert code == 2
    assert "SMTPGATE_RULES_FILE" in err


@pytest.mark.parametrize(
    ("verb", "variable", "value"),
    [
        (("serve",), "SMTPGATE_WORKERS", "0"),
        (("queue", "list"), "SMTPGATE_WORKERS", "0"),
        (("rules",), "SMTPGATE_RULES_FILE", "/nonexistent/rules.toml"),  # settings valid
    ],
)
def test_with_json_logs_a_start_up_error_is_reported_as_one_json_line(
    tmp_path: Path, verb: tuple[str, ...], variable: str, value: str
) -> None:
    """Log collectors parse every stderr line: the start-up error must be JSON too."""
    env = {variable: value, "SMTPGATE_LOG_FORMAT": "json"}
    result = run(tmp_path / "var", *verb, env=env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert variable in entry["message"]
    assert entry["ts"].endswith("Z")


def test_json_logs_asked_for_in_a_dot_env_file_apply_to_a_start_up_error(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    (data / ".env").write_text("smtpgate_log_format=json\n")  # run() works in the data dir
    result = run(data, "queue", "list", env={"SMTPGATE_WORKERS": "0"})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "SMTPGATE_WORKERS" in json.loads(line)["message"]


def test_an_invalid_log_format_itself_is_reported_as_plain_text(tmp_path: Path) -> None:
    result = run(tmp_path / "var", "queue", "list", env={"SMTPGATE_LOG_FORMAT": "xml"})
    assert result.returncode == 2
    assert result.stderr.startswith("smtpgate: invalid setting")
    assert "SMTPGATE_LOG_FORMAT" in result.stderr


# --- start-up failures: a clear error naming the variable, and the process ends --------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SMTPGATE_SMTP_PORT": "{busy}"}, "SMTPGATE_SMTP_PORT"),
        ({"SMTPGATE_HTTP_PORT": "{busy}"}, "SMTPGATE_HTTP_PORT"),
        (
            {"SMTPGATE_TLS_CERT_FILE": "/nonexistent/c.pem", "SMTPGATE_TLS_KEY_FILE": "/x/k.pem"},
            "SMTPGATE_TLS_CERT_FILE",
        ),
    ],
    ids=["smtp-port-in-use", "http-port-in-use", "tls-files-missing"],
)
def test_serve_that_cannot_start_says_which_variable_and_exits(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    """Before, a traceback, and the store's threads kept the process alive for ever (still
    holding the data directory's lock): a service manager saw it running."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        settings = {"SMTPGATE_SMTP_PORT": "0", "SMTPGATE_HTTP_PORT": "0"}
        settings |= {k: v.format(busy=port) for k, v in env.items()}
        result = run(tmp_path / "var", "serve", env=settings)
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr
    assert "Traceback" not in result.stderr
    # Ending in the error: "smtpgate stopped" came after it, for a gateway never started.
    assert variable in result.stderr.splitlines()[-1]
    assert "smtpgate stopped" not in result.stderr


def test_optional_paths_given_empty_are_unset(tmp_path: Path) -> None:
    """SMTPGATE_RULES_FILE= (compose's ${VAR:-}) read "." and stopped: "cannot read .: Is a
    directory"; so did empty TLS files. Empty is unset, as for the other optional settings."""
    settings = load_settings(
        _env_file=None, data_dir=tmp_path, rules_file="", tls_cert_file=" ", tls_key_file=""
    )
    assert (settings.rules_file, settings.tls_cert_file, settings.tls_key_file) == (None,) * 3


def test_status_of_a_data_dir_with_no_store_is_an_error_not_an_empty_queue(
    tmp_path: Path,
) -> None:
    result = run(tmp_path / "typo", "status")
    assert result.returncode == 1
    assert "SMTPGATE_DATA_DIR" in result.stderr
    assert not (tmp_path / "typo" / "smtpgate.db").exists()  # not created either


@pytest.mark.parametrize("verb", [("status",), ("queue", "list"), ("serve",)])
def test_a_file_that_is_not_a_store_is_named_not_a_traceback(
    tmp_path: Path, verb: tuple[str, ...]
) -> None:
    data = tmp_path / "var"
    data.mkdir()
    (data / "smtpgate.db").write_bytes(bytes(range(256)) * 32)
    result = run(data, *verb, env={"SMTPGATE_SMTP_PORT": "0", "SMTPGATE_HTTP_PORT": "0"})
    assert result.returncode == 2, result.stderr
    assert "SMTPGATE_DATA_DIR" in result.stderr
    assert "not a readable smtpgate store" in result.stderr
    assert "Traceback" not in result.stderr


# --- operator mistakes: one clear line, never a traceback ---------------------------------------


def _latin1_csv(tmp_path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    csv_file = tmp_path / "accounts.csv"
    csv_file.write_bytes("rec_id,file_as\nCRDMUELLER0000000001,Müller\n".encode("cp1252"))
    return ("accounts", "import", str(csv_file)), {}


# Each mistake: (its command line and settings, given the test's folder), exit code, message.
MISTAKES = {
    "explain-missing-file": (
        lambda tmp: (("explain", str(tmp / "nope.eml")), {}),
        1,
        "cannot read",
    ),
    "outbox-retry-not-a-number": (
        lambda tmp: (("outbox", "retry", "abc"), {}),
        2,
        "not an outbox id",
    ),
    "backup-to-a-directory": (lambda tmp: (("backup", str(tmp)), {}), 1, "is a directory"),
    "backup-onto-the-store": (
        lambda tmp: (("backup", str(tmp / "var" / "smtpgate.db-wal")), {}),
        1,
        "is the live store itself",
    ),
    "queue-without-a-store": (lambda tmp: (("queue", "list"), {}), 1, "no store at"),
    "data-dir-cannot-be-made": (  # an import makes the store (it may come before serve)
        lambda tmp: (
            ("accounts", "import", str(FIXTURES / "accounts.csv")),
            {"SMTPGATE_DATA_DIR": "/proc/nope"},
        ),
        2,
        "SMTPGATE_DATA_DIR: cannot create",
    ),
    "data-dir-empty": (
        lambda tmp: (("queue", "list"), {"SMTPGATE_DATA_DIR": ""}),
        2,
        "SMTPGATE_DATA_DIR",
    ),
    "relay-password-without-user": (
        lambda tmp: (("queue", "list"), {"SMTPGATE_RELAY_PASSWORD": "p"}),
        2,
        "SMTPGATE_RELAY_USERNAME",
    ),
    "latin1-csv": (_latin1_csv, 1, "line 2: not UTF-8"),
    # Both: the ID was ignored and every dead message (poison mail too) processed again.
    "queue-retry-an-id-and-dead": (
        lambda tmp: (("queue", "retry", "MSGAAAAAAAAAA1", "--dead"), {}),
        2,
        "not allowed with",
    ),
    "outbox-retry-an-id-and-dead": (
        lambda tmp: (("outbox", "retry", "7", "--dead"), {}),
        2,
        "not allowed with",
    ),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_an_operator_mistake_is_one_clear_line(tmp_path: Path, case: str) -> None:
    build, code, says = MISTAKES[case]
    args, env = build(tmp_path)
    result = run(tmp_path / "var", *args, env=env)
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_without_a_store_make_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mistyped SMTPGATE_DATA_DIR (or one a cron job's environment lacks) is not an empty
    queue: `backup` used to make an empty store there, back it up and report success."""
    data = tmp_path / "elsewhere"
    target = tmp_path / "backups" / "nightly.db"
    for args in (("backup", str(target)), ("queue", "list"), ("outbox", "retry", "--dead")):
        code, out, err = run_here(monkeypatch, data, *args)
        assert code == 1, (args, out, err)
        assert f"no store at {data / 'smtpgate.db'}" in err
    assert list(data.iterdir()) == []
    assert not target.parent.exists()


def test_an_empty_store_file_is_no_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A zero-byte smtpgate.db (a `touch`, a copy that failed) was taken for a store and given
    the schema by `status`, `queue list` and `backup`, which never change the store."""
    data = tmp_path / "var"
    data.mkdir()
    (data / "smtpgate.db").touch()
    target = tmp_path / "backup.db"
    for args in (("status",), ("queue", "list"), ("backup", str(target))):
        code, out, err = run_here(monkeypatch, data, *args)
        assert code == 1, (args, out, err)
        assert f"no store at {data / 'smtpgate.db'}" in err
    assert (data / "smtpgate.db").stat().st_size == 0
    assert not target.exists()


def test_a_backup_is_private_and_replaces_the_last_one_whole(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = tmp_path / "var"
    assert run_here(monkeypatch, data, "accounts", "import", str(FIXTURES / "accounts.csv"))[0] == 0
    target = tmp_path / "backups" / "nightly.db"
    target.parent.mkdir()
    target.write_bytes(b"yesterday's backup")
    target.chmod(0o644)
    code, out, err = run_here(monkeypatch, data, "backup", str(target))
    assert "backup written" in out
    assert code == 0, err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # it holds customer mail
    assert [p.name for p in target.parent.iterdir()] == ["nightly.db"]  # no part file left
    with contextlib.closing(sqlite3.connect(target)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT count(*) FROM accounts").fetchone()[0] > 0


def test_a_store_from_a_newer_version_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A downgrade would write rows the newer schema does not expect (or fail every intake):
    refused at start, naming the variable, and the store is left as it was."""
    data = tmp_path / "var"
    assert run_here(monkeypatch, data, "accounts", "import", str(FIXTURES / "accounts.csv"))[0] == 0
    with contextlib.closing(sqlite3.connect(data / "smtpgate.db")) as db, db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 'now')")
    # status too: monitoring polling it saw a healthy gateway after a failed downgrade
    for args in (("queue", "list"), ("serve",), ("status",), ("status", "--json")):
        code, out, err = run_here(
            monkeypatch, data, *args, env={"SMTPGATE_SMTP_PORT": "0", "SMTPGATE_HTTP_PORT": "0"}
        )
        assert code == 2, (args, out, err)
        assert "SMTPGATE_DATA_DIR: the store was written by a newer smtpgate" in err
        assert "schema version 999" in err
        assert "Traceback" not in err
    with contextlib.closing(sqlite3.connect(data / "smtpgate.db")) as db:
        assert db.execute("SELECT max(version) FROM schema_migrations").fetchone() == (999,)


def as_an_older_version_left_it(data: Path) -> None:
    """The store as the version before the last migration wrote it."""
    version, _, step = MIGRATIONS[-1]  # update this helper when a migration is added
    assert version == 8
    assert "crashes" in str(step)
    with contextlib.closing(sqlite3.connect(data / "smtpgate.db")) as db, db:
        db.execute("DELETE FROM schema_migrations WHERE version = 8")
        db.execute("ALTER TABLE inbound DROP COLUMN crashes")


def schema_version(data: Path) -> int:
    with contextlib.closing(sqlite3.connect(data / "smtpgate.db")) as db:
        return int(db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])


def test_only_serve_upgrades_the_store_and_a_backup_works_before_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every command migrated the store it opened: a backup timer that ran between `pip install
    -U` and the restart changed the schema under the old serve, which still wrote the old way.
    Commands now refuse a store that needs a migration (naming the variable and the way out);
    a backup copies it as it is; serve upgrades it."""
    data = tmp_path / "var"
    assert run_here(monkeypatch, data, "accounts", "import", str(FIXTURES / "accounts.csv"))[0] == 0
    as_an_older_version_left_it(data)
    old = MIGRATIONS[-1][0] - 1
    for args in (
        ("queue", "list"),
        ("outbox", "list"),
        ("tickets", "list"),
        ("accounts", "list"),
        ("accounts", "import", str(FIXTURES / "accounts.csv")),
        ("explain", str(FIXTURES / "01-alert-ticket.eml")),
    ):
        code, out, err = run_here(monkeypatch, data, *args)
        assert code == 2, (args, out, err)
        assert f"SMTPGATE_DATA_DIR: the store has schema version {old}" in err
        assert "restart `smtpgate serve`" in err
        assert "Traceback" not in err
        assert schema_version(data) == old
    code, out, err = run_here(monkeypatch, data, "backup", str(tmp_path / "before-upgrade.db"))
    assert code == 0, err
    assert schema_version(data) == old
    with contextlib.closing(sqlite3.connect(tmp_path / "before-upgrade.db")) as copy:
        assert copy.execute("SELECT count(*) FROM accounts").fetchone()[0] > 0
    # serve upgrades (start-up fails later on purpose: the port is taken)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"SMTPGATE_SMTP_PORT": str(taken.getsockname()[1]), "SMTPGATE_HTTP_PORT": "0"}
        code, out, err = run_here(monkeypatch, data, "serve", env=env)
    assert code != 0
    assert schema_version(data) == MIGRATIONS[-1][0]
    assert run_here(monkeypatch, data, "queue", "list")[0] == 0


def test_explain_without_a_store_makes_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mistyped SMTPGATE_DATA_DIR got an empty store, and explain answered against it without
    a word. It still explains (rules can be tried before serve ever ran), says so, and leaves
    no store behind."""
    data = tmp_path / "typo"
    code, out, err = run_here(
        monkeypatch, data, "explain", str(FIXTURES / "03-alert-unknown-site.eml")
    )
    assert code == 0, err
    assert "action:" in out
    assert "no store at" in err
    assert "explained against an empty directory" in err
    assert list(data.iterdir()) == []


@pytest.mark.parametrize(
    "args", [("serve",), ("accounts", "import", str(FIXTURES / "accounts.csv"))]
)
def test_a_data_directory_without_write_access_is_named_at_start(
    monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    """A directory smtpgate cannot create files in (here /proc/self: even root cannot) gave a
    traceback from SQLite ("unable to open database file") or from the lock file."""
    env = {"SMTPGATE_SMTP_PORT": "0", "SMTPGATE_HTTP_PORT": "0"}
    code, out, err = run_here(monkeypatch, Path("/proc/self"), *args, env=env)
    assert code == 2, (out, err)
    assert "SMTPGATE_DATA_DIR: cannot write in /proc/self" in err
    assert "Traceback" not in err


def test_a_store_sqlite_cannot_open_is_named_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = tmp_path / "var"
    (data / "smtpgate.db").mkdir(parents=True)  # a directory where the store should be
    code, out, err = run_here(monkeypatch, data, "accounts", "list")
    assert code == 2, (out, err)
    assert f"SMTPGATE_DATA_DIR: cannot open the store {data / 'smtpgate.db'}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ("tickets", "show", "99999999999999999999999"),  # was an OverflowError traceback
        ("tickets", "show", "0"),
        ("queue", "list", "--limit", "-1"),  # listed everything
        ("outbox", "list", "--limit", "0"),
        ("accounts", "list", "--limit", "-5"),
        ("tickets", "list", "--limit", "x"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run(tmp_path / "var", *args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: smtpgate")
    assert result.stdout == ""


def test_the_version_is_told_and_is_the_installed_ones(tmp_path: Path) -> None:
    """An operator checking an upgrade (docs/operations.md) could not tell which version ran."""
    result = run(tmp_path / "var", "--version")
    assert (result.returncode, result.stdout) == (0, f"smtpgate {smtpgate.__version__}\n")
    assert importlib.metadata.version("smtpgate") == smtpgate.__version__


def test_help_says_what_every_verb_does(tmp_path: Path) -> None:
    out = run(tmp_path / "var", "--help").stdout
    for verb in ("serve", "status", "explain", "queue", "outbox", "tickets", "accounts",
                 "contacts", "employees", "rules", "backup"):  # fmt: skip
        assert re.search(rf"^ +{verb} +\S", out, re.MULTILINE), (verb, out)


@pytest.mark.parametrize(
    ("value", "one"),
    [
        ("jane@acme.example", True),
        ('"john smith"@example.com', True),  # a quoted local part is one address (RFC 5321)
        ('"a@b"@example.com', True),
        ("postmaster@[192.0.2.1]", True),  # an address literal
        ("Jane Roe <jane@acme.example>", False),
        ("a@x.example; b@x.example", False),
        ("a@x.example, b@x.example", False),
        ("jane @acme.example", False),
        ('"unclosed@example.com', False),
        ("@acme.example", False),
        ("jane@", False),
    ],
)
def test_an_import_takes_one_bare_address_as_the_parser_gives_a_sender(
    value: str, one: bool
) -> None:
    assert is_bare_address(value) is one
    if one:  # what the parser gives as the sender of mail from that address matches it
        msg = parse_message(f"From: {value}\r\nSubject: x\r\n\r\nhi\r\n".encode())
        assert msg.from_address == value


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_the_ready_line_gives_a_usable_url_for_an_ipv6_host(tmp_path: Path) -> None:
    """`HTTP on http://::1:PORT/` is no URL (RFC 3986 3.2.2 brackets an IPv6 address): pasted
    into a browser or curl it failed. The listening log line wrote it the same way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        SMTPGATE_DATA_DIR=str(tmp_path),
        SMTPGATE_SMTP_HOST="::1",
        SMTPGATE_HTTP_HOST="::1",
        SMTPGATE_HTTP_PORT="0",
        SMTPGATE_SMTP_PORT="0",
        SMTPGATE_INTAKE_PROCESSES="0",
    )
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "smtpgate", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            for _ in range(50):  # the start-up lines, up to the ready line
                lines.append(proc.stderr.readline())
                if "HTTP on" in lines[-1] or not lines[-1]:
                    break
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ready = lines[-1]
    url = ready.split("HTTP on ", 1)[1].split()[0]
    parts = urllib.parse.urlsplit(url)
    assert (parts.hostname, parts.port is not None) == ("::1", True), ready
    assert re.search(r"SMTP on \[::1\]:\d+,", ready), ready
    listening = next(line for line in lines if "listening on" in line)
    assert re.search(r"listening on \[::1\]:\d+ \(SMTP\) and \[::1\]:\d+ \(HTTP\)", listening)
