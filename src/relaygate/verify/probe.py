"""Asking an MX about addresses, on aiosmtplib: EHLO, STARTTLS where offered,
then per address MAIL FROM, RCPT TO and RSET. Never DATA: nothing is sent.

One ``ProbeSession`` is one connection, reused for many addresses of one
domain (``[verify] rcpts_per_connection``), so a long list at one domain
costs a handful of connections. STARTTLS does not check the certificate:
the probe carries no secret and a refused handshake would only hide the
answer (docs/verify.md says so).
"""

from __future__ import annotations

import secrets
import ssl

import aiosmtplib

from relaygate.delivery.mx import Target
from relaygate.verify.classify import Probe, Reply


class ProbeFailed(Exception):
    """No RCPT answer from this connection: ``reason`` is ``timeout``,
    ``unreachable`` or ``probe_refused``; the text is safe (Reply.of / clean)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


def _no_verify_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def random_local_part() -> str:
    """A local part no one has: the catch-all question."""
    return "rg-verify-" + secrets.token_hex(8)


class ProbeSession:
    def __init__(self, target: Target, port: int, helo: str, timeout: float) -> None:
        self.target = target
        self._client = aiosmtplib.SMTP(
            hostname=target.address,
            port=port,
            local_hostname=helo,
            timeout=timeout,
            start_tls=False,
            use_tls=False,
        )
        self._smtputf8 = False

    async def open(self) -> None:
        """Connect, EHLO, STARTTLS if offered. Raises ProbeFailed."""
        client = self._client
        try:
            await client.connect()
            await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls(
                    server_hostname=self.target.host, tls_context=_no_verify_context()
                )
                await client.ehlo()
            self._smtputf8 = client.supports_extension("smtputf8")
        except aiosmtplib.SMTPTimeoutError as exc:
            self.close()
            raise ProbeFailed("timeout", Reply.of(0, f"{self.target.host}: {exc}").text) from None
        except aiosmtplib.SMTPResponseException as exc:
            self.close()
            raise ProbeFailed("probe_refused", Reply.of(exc.code, exc.message).text) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self.close()
            text = Reply.of(0, f"{self.target.host}: {exc or type(exc).__name__}").text
            raise ProbeFailed("unreachable", text) from None

    async def ask(self, sender: str, address: str, random_address: str | None) -> Probe:
        """One transaction: MAIL, RCPT address [, RCPT random], RSET."""
        client = self._client
        needs_utf8 = not (sender + address).isascii()
        if needs_utf8 and not self._smtputf8:
            # Asking anyway would get a 553 that says nothing about the mailbox.
            text = f"{self.target.host} does not offer SMTPUTF8, needed for this address"
            return Probe(failure="probe_refused", failure_text=text)
        options = ["SMTPUTF8"] if needs_utf8 else []
        try:
            mail = await client.execute_command(
                b"MAIL", b"FROM:<" + sender.encode() + b">", *[o.encode() for o in options]
            )
            if not 200 <= mail.code < 300:
                raise ProbeFailed("probe_refused", Reply.of(mail.code, mail.message).text)
            rcpt = await client.execute_command(b"RCPT", b"TO:<" + address.encode() + b">")
            answer = Reply.of(rcpt.code, rcpt.message)
            random_reply = None
            if random_address is not None and 200 <= rcpt.code < 300:
                other = await client.execute_command(
                    b"RCPT", b"TO:<" + random_address.encode() + b">"
                )
                random_reply = Reply.of(other.code, other.message)
            await client.execute_command(b"RSET")
        except aiosmtplib.SMTPTimeoutError as exc:
            self.close()
            raise ProbeFailed("timeout", Reply.of(0, f"{self.target.host}: {exc}").text) from None
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            self.close()
            text = Reply.of(0, f"{self.target.host}: {exc or type(exc).__name__}").text
            raise ProbeFailed("unreachable", text) from None
        return Probe(rcpt=answer, random_rcpt=random_reply)

    async def quit(self) -> None:
        try:
            if self._client.is_connected:
                await self._client.quit()
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._client.close()
