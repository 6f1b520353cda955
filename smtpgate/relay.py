"""Delivery to the upstream relay with aiosmtplib: reused connections, replies mapped to
transient (4xx, timeouts, refused connections: retry on the schedule) or permanent (5xx: dead)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import aiosmtplib

from smtpgate.config import Settings

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool, code: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code


class RelayClient:
    """One SMTP connection to the relay, opened on first use and reused until it fails."""

    def __init__(self, settings: Settings, tls_context: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._tls_context = tls_context
        self._smtp: aiosmtplib.SMTP | None = None

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.relay_host,
            port=s.relay_port,
            use_tls=s.relay_tls == "tls",
            start_tls=s.relay_tls == "starttls",
            timeout=s.relay_timeout,
            local_hostname=s.hostname,
            tls_context=self._tls_context,
        )
        await smtp.connect()
        if s.relay_username:
            password = s.relay_password.get_secret_value() if s.relay_password else ""
            await smtp.login(s.relay_username, password)
        self._smtp = smtp
        return smtp

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: bytes) -> str:
        """Deliver one mail; return the relay's reply or raise DeliveryError."""
        try:
            smtp = await self._connection()
            errors, reply = await smtp.sendmail(mail_from, list(recipients), data)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await self.close()
            codes = [e.code for e in exc.recipients]
            permanent = all(500 <= c < 600 for c in codes)
            raise DeliveryError(f"recipients refused: {exc}", permanent=permanent) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self.close()
            raise DeliveryError(
                f"{exc.code} {exc.message}", permanent=500 <= exc.code < 600, code=exc.code
            ) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False) from exc
        if errors:
            # Some recipients refused: our rows have one recipient each, so this is rare.
            log.warning("relay refused some recipients: %s", errors)
        return reply

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await smtp.quit()
            smtp.close()


def relay_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Verifying context for the relay unless SMTPGATE_RELAY_TLS_VERIFY is off."""
    if settings.relay_tls == "none":
        return None
    context = ssl.create_default_context()
    if not settings.relay_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
