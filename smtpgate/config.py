"""Settings (SMTPGATE_* environment variables) and the rules file, validated once at start-up.

Everything here is pure: building a `Settings` or `Rules` reads the environment or a file and
either returns a frozen snapshot or raises `ConfigError` naming the variable, rule or line at fault.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import ipaddress
import os
import re
import socket
import tempfile
import tomllib
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, DotEnvSettingsSource, NoDecode, SettingsConfigDict

from smtpgate.model import address_key, nfc

ENV_PREFIX = "SMTPGATE_"

_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
_DOMAIN = re.compile(r"[^@\s<>.]+(?:\.[^@\s<>.]+)*")  # labels, no empty one ("@", "@.")
_HOST_WITH_PORT = re.compile(r"[^:\[\]]+:\d+")  # smtp.example.com:587, not ::1 or [::1]


class ConfigError(Exception):
    """A setting or rule is invalid; the message names the variable or rule and line."""


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _check_address(value: str) -> str:
    """An address setting as the gateway compares it: lower case, and without the DNS root's
    dot a zone-file habit may add ("helpdesk@example.com.": RCPT never names it so)."""
    value = value.strip().lower()
    if not _ADDRESS.match(value):
        raise ValueError(f"{value!r} is not an e-mail address")
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain[:-1]}" if domain.endswith(".") and domain != "." else value


# A host name as the gateway writes it into EHLO and Received: lines, and as it takes it for the
# status page's Host: ASCII letters, digits, "-", "." and "_" (container host names).
_HOST_NAME = r"[A-Za-z0-9_.-]{1,253}"
CsvTuple = Annotated[tuple[str, ...], NoDecode]
CsvInts = Annotated[tuple[int, ...], NoDecode]


# Where settings come from; also what requested_log_format reads, so the two cannot differ.
_SOURCES = SettingsConfigDict(
    env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
)


class Settings(BaseSettings):
    """Every SMTPGATE_* variable; the README's settings table is generated from the same names."""

    model_config = SettingsConfigDict(**_SOURCES, frozen=True, validate_default=True)

    data_dir: Path = Field(Path("./var"), description="holds smtpgate.db")
    smtp_host: str = Field("127.0.0.1", description="SMTP listener address")
    smtp_port: int = Field(2525, ge=0, le=65535, description="SMTP listener port")
    http_host: str = Field("127.0.0.1", description="status/health/metrics listener address")
    http_port: int = Field(8025, ge=0, le=65535, description="status/health/metrics port")
    hostname: str = Field(
        default_factory=socket.gethostname,
        description="name used in the SMTP greeting and Received: headers",
    )
    http_names: CsvTuple = Field(
        (),
        description="more host names the status page answers to (DNS rebinding); * for any",
    )
    connector_addresses: CsvTuple = Field(
        ("connector@localhost",),
        description="comma-separated; the only accepted recipients",
    )
    internal_support_address: str = Field(
        "support@localhost", description="manual-processing target"
    )
    skip_forward_address: str | None = Field(
        None, description="target of skip rules (default: internal support)"
    )
    from_address: str | None = Field(
        None, description="sender of responses and forwards (default: first connector address)"
    )
    relay_host: str = Field("127.0.0.1", description="upstream relay host")
    relay_port: int = Field(25, ge=1, le=65535, description="upstream relay port")
    relay_username: str | None = Field(None, description="relay AUTH user (optional)")
    relay_password: SecretStr | None = Field(None, description="relay AUTH password (optional)")
    relay_tls: Literal["none", "starttls", "tls"] = Field(
        "none", description="relay TLS mode: none, starttls, tls"
    )
    relay_tls_verify: bool = Field(True, description="verify the relay's TLS certificate")
    relay_timeout: float = Field(
        30.0, gt=0, description="seconds per relay command, and for data that stops moving"
    )
    relay_data_timeout: float = Field(
        600.0, gt=0, description="seconds to wait for the relay's reply to the end of data"
    )
    relay_connections: int = Field(4, ge=1, le=64, description="parallel relay connections")
    max_message_bytes: int = Field(26214400, ge=1024, description="larger messages get 552")
    max_recipients: int = Field(100, ge=1, description="recipients per message (more: 452)")
    max_connections: int = Field(200, ge=1, description="concurrent SMTP sessions (more: 421)")
    smtp_timeout: float = Field(
        300.0,
        gt=0,
        description="idle seconds before an SMTP session is dropped (in DATA: per 64 KiB received)",
    )
    store_timeout: float = Field(
        8.0, gt=0, le=60, description="seconds to wait for a commit before answering 451"
    )
    tls_cert_file: Path | None = Field(None, description="enables STARTTLS on the listener")
    tls_key_file: Path | None = Field(None, description="key for SMTPGATE_TLS_CERT_FILE")
    workers: int = Field(32, ge=1, le=256, description="concurrent message processors")
    intake_processes: int = Field(
        default_factory=lambda: 1 if (os.cpu_count() or 1) > 1 else 0,
        ge=0,
        le=16,
        description="SMTP listener processes (0: the listener runs in the serve process);"
        " default 1, or 0 on a single-CPU machine",
    )
    process_max_attempts: int = Field(
        5, ge=1, description="processing attempts before a message goes dead"
    )
    retry_schedule: CsvInts = Field(
        (60, 300, 900, 1800, 3600),
        description="seconds between relay attempts; the last value repeats",
    )
    retry_max_age: int = Field(
        259200, ge=1, description="undelivered after this many seconds: dead"
    )
    retention_days: int = Field(30, ge=0, description="raw bytes of done messages kept this long")
    automated_enabled: bool = Field(True, description="branch 2.1 (automated email)")
    acknowledge: bool = Field(False, description="acknowledge new tickets from customers")
    auto_mail_hourly_limit: int = Field(
        20, ge=0, description="automatic mails (acks, responses) per recipient per hour"
    )
    api_enabled: bool = Field(False, description="branch 2.2 (XML API by email)")
    api_password: SecretStr | None = Field(None, description="required XML <Password>")
    api_send_response: bool = Field(True, description="mail XML responses")
    api_response_bcc: str | None = Field(None, description="BCC of every XML response")
    api_max_xml_bytes: int = Field(
        1048576, ge=1024, le=4194304, description="larger XML: 150012 (at most 4 MiB)"
    )
    api_time_zone: str | None = Field(
        None, description="zone of XML dates and times given without one; unset: the machine's"
    )
    rules_file: Path | None = Field(None, description="TOML rules file")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text or json logs")

    @field_validator("connector_addresses", "http_names", mode="before")
    @classmethod
    def _connectors(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", "relay_tls", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("connector_addresses")
    @classmethod
    def _connectors_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one connector address is required")
        return tuple(_check_address(v) for v in value)

    @field_validator("http_names")
    @classmethod
    def _http_names_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name != "*" and not re.fullmatch(_HOST_NAME, name):
                raise ValueError(f"{name!r} is not a host name (or * for any)")
        return tuple(name.lower().rstrip(".") for name in value)

    @field_validator("hostname")
    @classmethod
    def _hostname_valid(cls, value: str) -> str:
        # It goes into EHLO and Received: lines as it is: ASCII letters, digits, "-", "." and
        # "_" (container host names), or an address literal.
        if not re.fullmatch(rf"{_HOST_NAME}|\[[0-9A-Fa-f:.]{{2,45}}\]", value):
            raise ValueError(
                f"{value!r} is not a host name (ASCII letters, digits, '-', '.', '_';"
                " or an address literal such as [192.0.2.1])"
            )
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _schedule_valid(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v < 1 for v in value):
            raise ValueError("a comma-separated list of positive seconds is required")
        return value

    @field_validator("skip_forward_address", "from_address", "api_response_bcc")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else _check_address(value)

    @field_validator("internal_support_address")
    @classmethod
    def _support_address(cls, value: str) -> str:
        # Empty, every forward (unknown senders, alerts without an account) had no target:
        # each such message failed until it went dead.
        if not value.strip():
            raise ValueError("is empty: give the address that gets mail for manual processing")
        return _check_address(value)

    @field_validator("smtp_host", "http_host", "relay_host")
    @classmethod
    def _host_given(cls, value: str, info: ValidationInfo) -> str:
        # Empty, a listener bound every interface (asyncio's host ""), the relay was unreachable.
        if not value.strip():
            raise ValueError("is empty: give a host name or address (0.0.0.0: every interface)")
        host = value.strip()
        # host:port (one colon: an IPv6 address has several) failed only when first used.
        if _HOST_WITH_PORT.fullmatch(host):
            port = f"{ENV_PREFIX}{str(info.field_name).removesuffix('_host').upper()}_PORT"
            raise ValueError(f"has a port: give the host alone and the port in {port}")
        # [::1], as URLs (and the ready line) write an IPv6 address: the resolver wants ::1.
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)
            return host
        if "://" in host:
            raise ValueError(f"{value!r} is a URL: give the host name alone")
        if not re.fullmatch(r"[^\s/@:,;\[\]]+", host):
            raise ValueError(f"{value!r} is not one host name or address")
        return host

    @field_validator(
        "relay_username", "relay_password", "rules_file", "tls_cert_file", "tls_key_file",
        "api_time_zone", mode="before",
    )  # fmt: skip
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # SMTPGATE_RELAY_USERNAME= (compose's ${VAR:-}) means no AUTH, not an empty login;
        # SMTPGATE_RULES_FILE= no rules file, not the directory ".".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_time_zone")
    @classmethod
    def _zone_known(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a time zone: give an IANA name such as Europe/Berlin"
            ) from None
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_given(cls, value: Any) -> Any:
        # An empty SMTPGATE_DATA_DIR would quietly mean the current directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give the directory that holds smtpgate.db")
        return value

    @model_validator(mode="after")
    def _no_loops(self) -> Settings:
        # spec 2.4: configuration that would send mail to a connector address is rejected.
        for name in ("internal_support_address", "skip_forward_address", "api_response_bcc"):
            address = getattr(self, name)
            if address is not None and self.is_connector(address):  # in any spelling
                raise ValueError(f"{ENV_PREFIX}{name.upper()} is a connector address (mail loop)")
        if self.api_enabled and self.api_password is not None and not self.api_password:
            # "SMTPGATE_API_PASSWORD=" (a blank line, a compose variable that is not set)
            # meant no password: anyone could change records by mail.
            raise ValueError(
                f"{ENV_PREFIX}API_PASSWORD is empty: give the password, or remove the variable"
                " to take transactions without one"
            )
        # A transaction's <Password> is read without its surrounding white space: a password
        # configured with it (a secret with a trailing newline) could never match, and every
        # transaction would be refused without an answer.
        password = self.api_password.get_secret_value() if self.api_password else ""
        if self.api_enabled and password != password.strip():
            raise ValueError(
                f"{ENV_PREFIX}API_PASSWORD has white space at its start or end, which a"
                " transaction's <Password> cannot have"
            )
        if self.max_connections < self.intake_processes:  # each takes a share of sessions
            raise ValueError(
                f"{ENV_PREFIX}MAX_CONNECTIONS ({self.max_connections}) is less than"
                f" {ENV_PREFIX}INTAKE_PROCESSES ({self.intake_processes}): each intake process"
                " needs one session at least"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"{ENV_PREFIX}TLS_CERT_FILE and {ENV_PREFIX}TLS_KEY_FILE must be set together"
            )
        # A password without a user was ignored (no AUTH), a user without one sent an empty
        # password: both are half a configuration. (Empty counts as not set.)
        if (self.relay_username is None) != (self.relay_password is None):
            raise ValueError(
                f"{ENV_PREFIX}RELAY_USERNAME and {ENV_PREFIX}RELAY_PASSWORD must be set together"
                " (both, not empty, or neither)"
            )
        # AUTH PLAIN/LOGIN over a plain connection hands the password to anyone on the path
        # (Postfix's client refuses it by default); to a relay on this host it stays here.
        plain = self.relay_tls == "none" and not _is_loopback(self.relay_host)
        if self.relay_username is not None and plain:
            raise ValueError(
                f"{ENV_PREFIX}RELAY_TLS is none, so {ENV_PREFIX}RELAY_PASSWORD would cross"
                f" the network to {self.relay_host} readable: use starttls or tls"
            )
        return self

    # Derived values: properties, so nothing is stored twice.
    @property
    def db_path(self) -> Path:
        return self.data_dir / "smtpgate.db"

    @property
    def sender_address(self) -> str:
        return self.from_address or self.connector_addresses[0]

    @property
    def skip_target(self) -> str:
        return self.skip_forward_address or self.internal_support_address

    @property
    def api_zone(self) -> tzinfo | None:
        """The zone of XML dates and times given without one; None: the machine's."""
        return None if self.api_time_zone is None else zoneinfo.ZoneInfo(self.api_time_zone)

    @functools.cached_property
    def connector_keys(self) -> dict[str, str]:
        """Each connector's comparison key (model.address_key) to the address as configured."""
        return {address_key(a): a for a in self.connector_addresses}

    def is_connector(self, address: str) -> bool:
        """Whether `address` is a connector address, in any spelling (case, IDNA, NFC)."""
        return address_key(address) in self.connector_keys

    def is_own_address(self, address: str) -> bool:
        """A connector or the address the gateway sends from: never an answer's recipient."""
        return self.is_connector(address) or address_key(address) == address_key(
            self.sender_address
        )


def make_data_dir(settings: Settings) -> None:
    """SMTPGATE_DATA_DIR, created if missing; ConfigError naming it if that cannot be, or if
    files cannot be made in it (SQLite needs its -wal and -shm files beside the store)."""
    try:
        # Not readable by other users: the store holds customer mail (0750 before the umask).
        settings.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{ENV_PREFIX}DATA_DIR: cannot create {settings.data_dir}: {exc.strerror or exc}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=settings.data_dir, prefix=".smtpgate-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{ENV_PREFIX}DATA_DIR: cannot write in {settings.data_dir}: {exc.strerror or exc}"
            " (the user smtpgate runs as needs to create files there)"
        ) from None


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment and overrides; ConfigError names the variable."""
    unknown = unknown_variables(os.environ)
    env_file = overrides.get("_env_file", _SOURCES["env_file"])
    if env_file is not None:
        try:
            # pydantic-settings reads only the fields from a .env file and drops the rest.
            written = DotEnvSettingsSource(Settings, env_file=env_file).env_vars
        except OSError as exc:
            # Not even whether it exists: `sudo -u smtpgate smtpgate status` from /root.
            raise ConfigError(
                f"{env_file}: {exc.strerror or exc} in the working directory: start smtpgate"
                " from a directory its user can read (it reads ./.env there)"
            ) from None
        except Exception:  # unreadable: Settings() below says so
            written = {}
        unknown += unknown_variables(
            {k.upper(): v or "" for k, v in written.items()}, f" in {env_file}"
        )
    if unknown:
        raise ConfigError("; ".join(unknown))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_settings_error(exc)) from None


# What platforms set for a service or container named smtpgate, not settings: Kubernetes
# (SMTPGATE_SERVICE_HOST, SMTPGATE_SERVICE_PORT_SMTP, SMTPGATE_PORT,
# SMTPGATE_PORT_25_TCP_ADDR, …) and Docker's legacy links (SMTPGATE_NAME, SMTPGATE_ENV_…).
_LINK_VARIABLE = re.compile(
    rf"{ENV_PREFIX}(SERVICE_(HOST|PORT)\w*|PORT(_\d+_(TCP|UDP|SCTP)\w*)?|NAME|ENV_\w+)"
)


def unknown_variables(environ: Mapping[str, str], where: str = "") -> list[str]:
    """SMTPGATE_* variables that are no setting, each with the setting it may be a typo of: a
    misspelled SMTPGATE_CONNECTOR_ADDRESS was ignored, and the gateway refused all mail."""
    names = {f"{ENV_PREFIX}{name}".upper(): name for name in Settings.model_fields}
    found = []
    for variable in sorted(environ):
        key = variable.upper()
        if key.startswith(ENV_PREFIX) and key not in names and not _LINK_VARIABLE.fullmatch(key):
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            found.append(f"unknown setting {variable}{where}{hint}")
    return found


class _LogFormatOnly(BaseSettings):
    """SMTPGATE_LOG_FORMAT read from the same sources as Settings (environment, .env), alone:
    the other settings may be what is invalid."""

    model_config = _SOURCES
    log_format: str = "text"


def requested_log_format() -> str:
    """The log format asked for, even when the settings as a whole do not validate."""
    try:
        return _LogFormatOnly().log_format.strip().lower()
    except Exception:  # an unreadable .env: the error that follows says so in plain text
        return "text"


def describe_settings_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if isinstance(p, str)]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if loc:
            parts.append(f"{ENV_PREFIX}{loc[0].upper()}: {msg}")
        else:
            parts.append(msg)
    return "invalid setting " + "; ".join(parts)


# --- rules file -----------------------------------------------------------------------------

SearchField = Literal[
    "file_as", "account_number", "account_id", "field1", "field2", "field3", "field4", "rec_id"
]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)
    name: str | None = None

    @field_validator("subject", "after", "before", check_fields=False)
    @classmethod
    def _phrase_nfc(cls, value: str | None) -> str | None:
        """Phrases compare with subjects in Unicode NFC (model.nfc), whatever the file's form.
        A phrase of white space only would be found at the subject's first space."""
        if value is not None and not value.strip():
            raise ValueError("is empty or only white space: give a phrase")
        return nfc(value) if value else value


class DetectionRule(_Rule):
    """Automated-email detection: sender list and/or subject phrase (both given: AND)."""

    sender: tuple[str, ...] = ()
    subject: str | None = None

    @field_validator("sender", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("sender")
    @classmethod
    def _senders(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for v in value:
            v = v.strip().lower()
            # "@example.com" or "*@example.com" match a whole domain; else an exact address.
            if v.startswith("*@"):
                v = v[1:]
            domain_only = v.startswith("@")
            if (domain_only and not _DOMAIN.fullmatch(v[1:])) or (
                not domain_only and not _ADDRESS.match(v)
            ):
                raise ValueError(f"{v!r} is not an address or @domain")
            # Compared as the gateway compares addresses (rules.automated.sender_matches):
            # tickets@bücher.example, its decomposed spelling and its xn-- form are one.
            out.append(address_key(v).rstrip("."))
        return tuple(out)

    @model_validator(mode="after")
    def _one_condition(self) -> DetectionRule:
        if not self.sender and not self.subject:
            raise ValueError("a detection rule needs 'sender', 'subject' or both")
        return self


class SkipRule(_Rule):
    """A detected automated message whose subject holds this phrase is forwarded untouched."""

    subject: str = Field(min_length=1)


class AccountRule(_Rule):
    """Find an account by a field value located after/before/between phrases of the subject."""

    # Phrases keep their outer spaces: `before = " - "` must not stop at the hyphen of "Acme-Bau".
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    search: SearchField
    after: str | None = None
    before: str | None = None

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str | None) -> str | None:
        return value.strip() if value else value

    @model_validator(mode="after")
    def _located(self) -> AccountRule:
        if not self.after and not self.before:
            raise ValueError("an account rule needs 'after', 'before' or both")
        return self


class _RuleError(ValueError):
    """A problem of `kind`[`index`] (its `key`: by default the name, which checks across rules
    find) raised with the location pydantic would not give it: parse_rules names its line (a
    whole-model check has none of its own, a list's check names only the list)."""

    def __init__(self, kind: str, index: int, message: str, key: str | None = "name") -> None:
        super().__init__(message)
        self.loc: tuple[str | int, ...] = (kind, index) if key is None else (kind, index, key)


class Rules(BaseModel):
    """The rules file: evaluated in listed order; names default to kind[index], 1-based."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account_by_sender: StrictBool = False  # true or false: "yes" is a mistake, not true
    ticket_tag: str = Field("Ticket", min_length=1, pattern=r"^[\w ]+$")
    quote_patterns: tuple[str, ...] = Field(default_factory=lambda: _default_quote_patterns())
    detection: tuple[DetectionRule, ...] = ()
    skip: tuple[SkipRule, ...] = ()
    account: tuple[AccountRule, ...] = ()

    @field_validator("quote_patterns")
    @classmethod
    def _regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, pattern in enumerate(value):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise _RuleError("quote_patterns", i, f"not a valid regex: {exc}", None) from None
        return value

    @model_validator(mode="after")
    def _names(self) -> Rules:
        for kind in ("detection", "skip", "account"):
            rules: tuple[_Rule, ...] = getattr(self, kind)
            named = tuple(
                r if r.name else r.model_copy(update={"name": f"{kind}[{i}]"})
                for i, r in enumerate(rules, 1)
            )
            object.__setattr__(self, kind, named)
        # Names are what outcomes, explain and /metrics report: two rules of one name would
        # be one there.
        seen: set[str] = set()
        for kind in ("detection", "skip", "account"):
            for i, rule in enumerate(getattr(self, kind)):
                if rule.name in seen:
                    raise _RuleError(kind, i, f"the rule name {rule.name!r} is used more than once")
                if rule.name in BUILT_IN_STEPS:
                    raise _RuleError(
                        kind,
                        i,
                        f"the rule name {rule.name!r} is the name of a built-in step"
                        f" (reported beside rule names: {', '.join(sorted(BUILT_IN_STEPS))})",
                    )
                seen.add(rule.name)
        return self

    def compiled_quote_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p, re.IGNORECASE) for p in self.quote_patterns)


def _is_loopback(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# What the pipeline reports in rules_hit/rules_missed beside the rules' own names.
BUILT_IN_STEPS = frozenset({"account_by_sender", "in_reply_to", "known_sender", "ticket_tag"})


def _default_quote_patterns() -> tuple[str, ...]:
    from smtpgate.mail import DEFAULT_QUOTE_PATTERNS  # lazily: CLI verbs without rules skip it

    return DEFAULT_QUOTE_PATTERNS


def parse_rules(text: str, source: str = "<rules>") -> Rules:
    """Parse and validate a rules file's text; ConfigError names the rule, key and line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return Rules.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            cause = err.get("ctx", {}).get("error")
            loc = cause.loc if isinstance(cause, _RuleError) else err["loc"]
            line = _line_of(text, loc)
            where = _describe_loc(loc, data)
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(
                f"{source}:{line}: {where}: {msg}" if line else f"{source}: {where}: {msg}"
            )
        raise ConfigError("invalid rules: " + "; ".join(problems)) from None


def load_rules(path: Path | None) -> Rules:
    if path is None:
        return Rules()
    try:
        text = path.read_text(encoding="utf-8-sig")  # Windows editors may write a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{ENV_PREFIX}RULES_FILE: cannot read {path}: {exc}") from None
    return parse_rules(text, str(path))


def _describe_loc(loc: Sequence[int | str], data: Any = None) -> str:
    if len(loc) >= 2 and isinstance(loc[1], int):
        rest = ".".join(str(p) for p in loc[2:])
        head = f"{loc[0]}[{loc[1] + 1}]"
        try:  # name the rule as the operator did, when it has a name
            name = data[loc[0]][loc[1]].get("name")
        except (AttributeError, IndexError, KeyError, TypeError):
            name = None
        if isinstance(name, str) and name.strip():
            head += f" ({name.strip()!r})"
        return f"{head} key '{rest}'" if rest else head
    return ".".join(str(p) for p in loc) or "file"


def _line_of(text: str, loc: Sequence[int | str]) -> int | None:
    """Best-effort line number of a validation error location in the TOML source."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
        header = re.compile(rf"^\s*\[\[\s*{re.escape(loc[0])}\s*\]\]")
        seen = -1
        for i, line in enumerate(lines):
            if header.match(line):
                seen += 1
                if seen == loc[1]:
                    start = i
                    end = next(
                        (j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("[")),
                        len(lines),
                    )
                    break
        else:  # no [[kind]] tables: an array written inline (kind = [ {…}, {…} ])
            element = _array_element(lines, loc[0], loc[1])
            if element is None:
                return None
            start, end = element[0], element[1] + 1
            key = loc[2] if len(loc) > 2 and isinstance(loc[2], str) else None
            if key:
                pattern = re.compile(rf"(?:^|[{{,])\s*{re.escape(key)}\s*=")
                for i in range(start, end):
                    if pattern.search(lines[i]):
                        return i + 1
            return start + 1
        key = loc[2] if len(loc) > 2 and isinstance(loc[2], str) else None
    else:
        key = loc[0] if loc and isinstance(loc[0], str) else None
        if key:  # an unknown table such as [[acount]] or [detection]: its header line
            header = re.compile(rf"^\s*\[\[?\s*{re.escape(key)}\s*\]")
            for i, line in enumerate(lines):
                if header.match(line):
                    return i + 1
        end = next((j for j, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))
    if key:
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start, end):
            if pattern.match(lines[i]):
                return i + 1
        if len(loc) >= 2:  # a sub-table of the rule, [kind.key], among the rule's own tables
            sub = re.compile(rf"^\s*\[\s*{re.escape(str(loc[0]))}\s*\.\s*{re.escape(key)}\s*\]")
            for i in range(end, len(lines)):
                if sub.match(lines[i]):
                    return i + 1
                if lines[i].lstrip().startswith("[["):  # the next rule
                    break
    return start + 1 if len(loc) >= 2 else None


def _array_element(lines: Sequence[str], key: str, index: int) -> tuple[int, int] | None:
    """The first and last line (0-based) of element `index` of the top-level array
    `key = [ … ]`, however it is spread over lines (strings, inline tables, comments)."""
    opening = re.compile(rf"^\s*{re.escape(key)}\s*=\s*\[")
    first = next((i for i, line in enumerate(lines) if opening.match(line)), None)
    if first is None:
        return None
    text = "\n".join(lines[first:])
    i, depth, n, line, begun, start = text.index("[") + 1, 1, -1, first, False, -1
    while i < len(text):
        c = text[i]
        if c == "\n":
            line += 1
        elif c == "#":  # a comment: to the end of its line
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        elif not c.isspace():
            if depth == 1 and c in ",]":
                if start >= 0:
                    return start, line
                begun = False
            elif depth == 1 and not begun:
                begun, n = True, n + 1
                if n == index:
                    start = line
            if c in "\"'":
                quote = c * 3 if text.startswith(c * 3, i) else c
                j = i + len(quote)
                while j < len(text) and not text.startswith(quote, j):
                    j += 2 if text[j] == "\\" and c == '"' else 1
                line += text.count("\n", i, j)
                i = j + len(quote)
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    break
        i += 1
    return (start, line) if start >= 0 else None
