"""The connection driver: feeds a socket's bytes to the SMTP session and acts on its events.

Thin on purpose: SMTP rules live in ``relaygate.smtp.session``; here we only
move bytes, start TLS, ask the services (accounts, policy, spool) and pass
their answers back. While a decision is pending (a password hash, a disk
commit) reading is paused, so a client cannot pile up input meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, cast

from relaygate import logs, metrics
from relaygate.accepted import SpooledMessage, SpoolError
from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.config import Config
from relaygate.eventloop import LARGE_BLOCK, release_memory_soon
from relaygate.sasl import BearerToken, Rejected, StoredKeys, Verified, failure_challenge
from relaygate.server.connlimit import ConnectionLimiter
from relaygate.server.tls import cipher_info
from relaygate.services.login import LoginResult, LoginService, failure_delay, login_problem
from relaygate.services.submission import Arrival, Envelope, Login, Refusal, SubmissionService
from relaygate.smtp import replies
from relaygate.smtp.events import (
    AuthRequest,
    Close,
    KeysRequest,
    MessageReady,
    RecipientRequest,
    Refused,
    SenderRequest,
    StartTLS,
)
from relaygate.smtp.session import PROXY_NOT_EXPECTED_REASON, Session, Settings, State
from relaygate.storage.redis.connections import RedisConnectionCounts
from relaygate.throttle import Reservation


class ConnectionHost(Protocol):
    """What a connection needs from the worker process that serves it (server/worker.py).

    A protocol, not the Worker class: the worker makes connections, so the
    connection must not import it back.
    """

    loop: asyncio.AbstractEventLoop
    config: Config
    connections: set[SMTPConnection]
    draining: bool
    max_connections: int
    tls_context: ssl.SSLContext
    limiter: ConnectionLimiter | None
    shared_connections: RedisConnectionCounts | None
    logins: LoginService
    submission: SubmissionService

    def generation(self) -> int:
        """The account-change signal's value (accounts/changes.py)."""
        ...

    async def admit_shared(self, client_ip: str) -> tuple[bool, str | None]:
        """The cluster-wide per-IP verdict: (counted, the rule refusing or None)."""
        ...

    def release_shared(self, client_ip: str) -> None:
        """A connection admit_shared counted has ended."""
        ...


# Refusals worth a log line at info level; syntax noise goes to debug.
_LOGGED_REFUSALS = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "AUTH"})
# relaygate_messages_refused_total's reasons (metrics.REFUSAL_REASONS) for the
# refusals the driver makes, and for those the session makes itself.
_SENDER_REFUSALS = {
    "sender": "sender_denied",
    "quota": "limit",
    "session_messages": "session_limit",
    "session_duration": "session_limit",
}
_TRANSACTION_COMMANDS = frozenset({"MAIL", "RCPT", "DATA", "BDAT"})


def _protocol_refusal(reply: bytes) -> str:
    if reply.startswith(b"552"):
        return "size"
    if reply == replies.TOO_MANY_RECIPIENTS:
        return "recipients"
    if reply == replies.AUTH_REQUIRED:
        return "auth_required"
    return "protocol"


# Replies queued in the transport above this stop us reading the client
# (flow control): a client that pipelines without reading holds at most this
# much of our output, plus one read of its input.
WRITE_HIGH_WATER = 64 * 1024
# After our last reply (421, 221) a client gets this long to read it before the
# connection is aborted: close() alone would wait forever on a peer that never reads.
CLOSE_GRACE = 5.0

T = TypeVar("T")


class SMTPConnection(asyncio.Protocol):
    def __init__(
        self,
        worker: ConnectionHost,
        settings: Settings,
        implicit_tls: bool,
        *,
        session_id: str | None = None,
        client_ip: str | None = None,
        proxy_peer: str | None = None,
        listener: str = "",
    ) -> None:
        self.worker = worker
        self.metrics = metrics.current()
        self.settings = settings
        self.implicit_tls = implicit_tls
        self.session = Session(settings, tls_active=implicit_tls)
        self.transport: asyncio.Transport | None = None
        self.session_id = session_id or os.urandom(5).hex()
        # Behind a load balancer (server/listener.py) the client is the PROXY
        # header's address, and the balancer is ``proxy_peer``.
        self.client_ip = client_ip or "?"
        self.proxy_peer = proxy_peer
        self.login: Login | None = None  # who is sending, under which rules
        self.new_recipients: list[str] = []  # first-time recipients in this transaction
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.waiting = False  # a decision is pending: do not read
        self.write_paused = False  # the transport's buffer is full: do not read
        self.write_paused_since = 0.0
        self._reading = True
        self.lost = False
        self.counted = False  # counted by the per-IP connection limiter
        self.shared_counted = False  # and by the cluster's (Redis)
        self._admission: asyncio.Future[None] | None = None
        self.started = time.time()
        self.last_activity = 0.0
        self.opened = 0.0  # loop time
        self.partial_since: float | None = None
        self.message_since: float | None = None
        self._tls_task: asyncio.Future[None] | None = None
        self._token = 0  # which pending decision an answer belongs to
        self.decision_deadline = 0.0
        self._reservation: Reservation | None = None  # a SCRAM exchange's throttle slot
        self.login_generation = 0  # the account-change signal when we logged in
        self.welcomed = False  # counted in relaygate_smtp_connections_active
        self.mail_since: float | None = None  # loop time of MAIL FROM (submission duration)
        self.metrics.connection_opened(listener)

    @property
    def account(self) -> Account | None:
        return self.login.account if self.login is not None else None

    @property
    def credential(self) -> Credential | None:
        return self.login.credential if self.login is not None else None

    # -------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.proxy_peer is None:
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if peer else "?"
        self.last_activity = self.opened = self.worker.loop.time()
        if self.implicit_tls:
            self.tls_version, self.tls_cipher = cipher_info(transport.get_extra_info("ssl_object"))
            self.metrics.tls_handshake(self.tls_version)
        reason: str | None = None
        if self.worker.draining:
            reason, reply = "shutting_down", replies.SHUTTING_DOWN
        elif len(self.worker.connections) >= self.worker.max_connections:
            reason, reply = "server_busy", replies.TOO_BUSY
        elif self.worker.limiter is not None:
            verdict = self.worker.limiter.open(self.client_ip, time.time())
            if verdict is not None:
                reason, reply = f"ip_{verdict}", replies.TOO_MANY_FROM_ADDRESS
            else:
                self.counted = True
        if reason is not None:
            self._refuse_at_open(reason, reply)
            return
        shared = self.worker.shared_connections
        if shared is not None and shared.counted(self.client_ip):
            # The cluster's count too (storage/redis/connections.py): greet once it says yes.
            self._wait()
            self._admission = asyncio.ensure_future(self._admit())
            return
        self._welcome()

    def _refuse_at_open(self, reason: str, reply: bytes) -> None:
        logs.event(
            "connect.refused",
            logging.WARNING,
            session=self.session_id,
            client_ip=self.client_ip,
            proxy=self.proxy_peer,
            reason=reason,
            reply=reply[:3].decode(),
        )
        if self.counted and self.worker.limiter is not None:
            self.worker.limiter.close(self.client_ip)
            self.counted = False
        assert self.transport is not None
        self.transport.write(reply)
        self.transport.close()
        self.lost = True

    async def _admit(self) -> None:
        counted, refused = await self.worker.admit_shared(self.client_ip)
        if self.lost:  # gone while we asked
            if counted:
                self.worker.release_shared(self.client_ip)
            return
        if refused is not None:
            self._refuse_at_open(f"ip_{refused}", replies.TOO_MANY_FROM_ADDRESS)
            return
        self.shared_counted = counted
        self.waiting = False
        self._update_reading()
        self._welcome()

    def _welcome(self) -> None:
        self.worker.connections.add(self)
        self.welcomed = True
        self.metrics.connection_greeted()
        logs.event(
            "connect",
            session=self.session_id,
            client_ip=self.client_ip,
            proxy=self.proxy_peer,
            tls=self.tls_version,
            cipher=self.tls_cipher,
        )
        self.session.greeting()
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.worker.loop.time()
        self.session.receive(data)
        self._drive()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_since = self.worker.loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.lost:
            return
        self._update_reading()
        self._drive()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def _forget(self) -> None:
        """The connection is gone: unregister it (once), release its per-IP slot, log."""
        if self.lost:
            return
        self.lost = True
        self.worker.connections.discard(self)
        if self.welcomed:
            self.metrics.connection_closed()
        self._abandon_reservation()
        if self.counted and self.worker.limiter is not None:
            self.worker.limiter.close(self.client_ip)
        if self.shared_counted:
            self.worker.release_shared(self.client_ip)
        logs.event(
            "disconnect",
            session=self.session_id,
            client_ip=self.client_ip,
            user=self.account.address if self.account else None,
            messages=self.session.messages_accepted,
            auth_failures=self.session.auth_failures or None,
            seconds=round(time.time() - self.started, 3),
        )

    # -------------------------------------------------------------- driving

    def _flush(self) -> None:
        out = self.session.take_output()
        if out and self.transport is not None and not self.lost:
            self.transport.write(out)

    def _drive(self) -> None:
        session = self.session
        while not self.waiting and not self.write_paused:
            event = session.next_event()
            if event is None:
                if not session.output_backlogged:
                    break
                self._flush()  # may pause writing: then we stop until resume_writing
                continue
            try:
                if not self._handle(event):
                    return
            except Exception as exc:  # a decision handler failed: answer, never wedge
                self._internal_error(exc)
                return
        self._flush()
        now = self.worker.loop.time()
        if session.has_partial_input:
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None
        if session.in_message:
            if self.message_since is None:
                self.message_since = now
        else:
            self.message_since = None

    def _handle(self, event: object) -> bool:
        """Act on one event; False when driving must stop here (TLS, close)."""
        kind = type(event)
        if kind is RecipientRequest:
            assert isinstance(event, RecipientRequest)
            self._on_recipient(event)
        elif kind is SenderRequest:
            assert isinstance(event, SenderRequest)
            self._on_sender(event)
        elif kind is MessageReady:
            assert isinstance(event, MessageReady)
            self._on_message(event)
        elif kind is AuthRequest:
            assert isinstance(event, AuthRequest)
            self._on_auth(event)
        elif kind is KeysRequest:
            assert isinstance(event, KeysRequest)
            self._on_keys(event)
        elif kind is Refused:
            assert isinstance(event, Refused)
            self._on_refused(event)
        elif kind is StartTLS:
            self._flush()
            self._wait()
            self._tls_task = asyncio.ensure_future(self._start_tls())
            return False
        elif kind is Close:
            if cast(Close, event).reason == PROXY_NOT_EXPECTED_REASON:
                logs.event(
                    "proxy.refused",
                    logging.WARNING,
                    session=self.session_id,
                    peer=self.client_ip,
                    reason="not_expected",
                )
            self._flush()
            self._close_transport()
            return False
        return True

    def _update_reading(self) -> None:
        """Read from the client only while no decision is pending and our replies flow."""
        want = not self.waiting and not self.write_paused
        transport = self.transport
        if want == self._reading or transport is None or self.lost:
            return
        self._reading = want
        if want:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _wait(self) -> None:
        self.waiting = True
        self._update_reading()

    def _resume(self) -> None:
        self.waiting = False
        if self.lost:
            return
        self._update_reading()
        self._drive()

    def _close_transport(self) -> None:
        """Close after the last reply is sent; abort if the client will not take it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        self.worker.loop.call_later(CLOSE_GRACE, self._abort_if_open, transport)

    def _abort_if_open(self, transport: asyncio.Transport) -> None:
        if not self.lost:
            transport.abort()

    # -------------------------------------------------------------- decisions

    def _decide(
        self,
        work: Awaitable[T],
        then: Callable[[asyncio.Future[T]], None],
        extra_time: float = 0.0,
    ) -> None:
        """Hold the session while ``work`` runs off the loop, then let ``then`` answer.

        Whatever goes wrong in ``work`` or ``then`` ends in ``_internal_error``
        (a 421/451 and a closed connection), never in a session that waits
        forever; a decision that outlasts the command timeout (plus ``extra_time``,
        for a deliberate delay) ends the same way (check_timeouts). A result that
        comes after that is dropped.
        """
        self._wait()
        self._token += 1
        token = self._token
        self.decision_deadline = (
            self.worker.loop.time() + self.worker.config.limits.command_timeout + extra_time
        )
        future = asyncio.ensure_future(work)
        future.add_done_callback(functools.partial(self._decided, token, then))

    def _decided(
        self, token: int, then: Callable[[asyncio.Future[T]], None], future: asyncio.Future[T]
    ) -> None:
        if self.lost or token != self._token:
            if not future.cancelled():
                future.exception()  # retrieved: asyncio must not log it as lost
            return
        try:
            then(future)
        except Exception as exc:  # a bug or a failed store: answer, never wedge
            self._internal_error(exc)
            return
        if token == self._token:  # ``then`` did not start another wait
            self._resume()

    def _internal_error(self, exc: BaseException) -> None:
        """Something failed while deciding: tell the client, hang up, keep serving others."""
        session = self.session
        reply = replies.LOCAL_ERROR if session.in_transaction else replies.SERVICE_ERROR
        logs.event(
            "internal.error",
            logging.ERROR,
            session=self.session_id,
            client_ip=self.client_ip,
            exception=repr(exc)[:500],
            reply=replies.status(reply),
        )
        self._token += 1  # late answers to what was pending are dropped
        self.waiting = True  # read nothing more
        session.fail(reply)
        self._flush()
        self._close_transport()

    # -------------------------------------------------------------- login

    def _abandon_reservation(self) -> None:
        """A SCRAM exchange got its keys and was then given up: count it as a failure."""
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            self.worker.logins.abandon(reservation)

    def _on_keys(self, event: KeysRequest) -> None:
        # SCRAM: the keys come only after a throttle reservation, or the proof
        # check would tell a client over its limit whether its guess was right.
        self._abandon_reservation()
        logins = self.worker.logins
        work = logins.scram_keys(event.username, self.client_ip, self.session.auth_failures)
        self._decide(work, functools.partial(self._keys_answered, event))

    def _keys_answered(
        self,
        event: KeysRequest,
        future: asyncio.Future[tuple[StoredKeys, Reservation] | LoginResult],
    ) -> None:
        answer = future.result()
        if isinstance(answer, LoginResult):
            self._auth_answered(event.mechanism, event.username, answer)
            return
        keys, self._reservation = answer
        self.session.provide_keys(keys)

    def _on_auth(self, event: AuthRequest) -> None:
        credentials = event.credentials
        logins = self.worker.logins
        failures = self.session.auth_failures
        work: Awaitable[LoginResult]
        if isinstance(credentials, BearerToken):
            self._abandon_reservation()
            work = logins.bearer(credentials.token, credentials.user, self.client_ip, failures)
        elif isinstance(credentials, Verified | Rejected):
            reservation, self._reservation = self._reservation, None
            work = logins.scram_finished(
                credentials.username,
                isinstance(credentials, Verified),
                reservation,
                self.client_ip,
                failures,
            )
        else:
            self._abandon_reservation()  # a SCRAM exchange left before its end
            if credentials.authzid and credentials.authzid.lower() != credentials.username.lower():
                # Acting as another user (proxy authorization) is not offered.
                delay = failure_delay(logins.config, failures + 1, 0)
                self._auth_answered(
                    event.mechanism,
                    credentials.username,
                    LoginResult(None, "authzid_mismatch", delay=delay),
                )
                return
            work = logins.password(
                credentials.username, credentials.password, self.client_ip, failures
            )
        username = credentials.username
        self._decide(
            work, lambda done: self._auth_answered(event.mechanism, username, done.result())
        )

    def _auth_answered(self, mechanism: str, username: str, result: LoginResult) -> None:
        """Answer the login; a failure reply may be held back (``result.delay``)."""
        fields = {
            "session": self.session_id,
            "client_ip": self.client_ip,
            "mechanism": mechanism,
            # OAuth: the client may name nobody; then the token's address, if it had one.
            "user": username or result.user or "",
        }
        account = result.account
        if account is not None:
            self.login = self.worker.submission.login(account, result.credential)
            self.worker.submission.logged_in(self.login, self.client_ip, self.session.helo_name)
            self.login_generation = self.worker.generation()
            self.session.auth_succeeded(account.address)
            self.metrics.auth_attempt(mechanism, "ok")
            logs.event(
                "auth.ok",
                **fields,
                credential=result.credential.name if result.credential else None,
                cached=result.cached or None,
            )
            return
        if result.outcome == "error":
            self.metrics.auth_attempt(mechanism, "failed")
            self.session.auth_failed(replies.AUTH_TEMPORARY_FAILURE)
            logs.event("auth.error", logging.WARNING, **fields, reply="454")
            return
        rules = self.worker.config.auth_throttle
        failures = self.session.auth_failures + 1  # counting this one
        closing = bool(rules.connection_close_after) and failures >= rules.connection_close_after
        verdict = result.verdict
        if verdict is not None:
            # Over a failure limit: refused without looking at the secret, so
            # guessing from here learns nothing until the window passes.
            self.metrics.auth_attempt(mechanism, "throttled")
            minutes = max(1, round(verdict.retry_after / 60))
            reply = replies.reply(
                454, "4.7.0", f"Too many failed logins, try again in {minutes} minute(s)"
            )
            logs.event(
                "auth.throttled",
                logging.WARNING,
                session=self.session_id,
                client_ip=self.client_ip,
                user=fields["user"],
                scope=verdict.scope,
                retry_after=round(verdict.retry_after),
                reply="454",
            )
        else:
            self.metrics.auth_attempt(mechanism, "failed")
            reply = (
                replies.AUTH_TEMPORARY_FAILURE if result.outcome == "busy" else replies.AUTH_FAILED
            )
            logs.event(
                "auth.fail",
                logging.WARNING,
                **fields,
                reason=result.outcome,
                failures=failures,
                reply="421" if closing else reply[:3].decode(),
            )
        if closing:
            reply = replies.AUTH_TOO_MANY_FAILURES
        bad_token = verdict is None and result.outcome != "busy"
        challenge = self._bearer_challenge(mechanism) if bad_token else None
        if result.delay > 0:
            # Each failure costs the client time; holding the connection costs us a timer.
            self._decide(
                asyncio.sleep(result.delay),
                lambda _: self.session.auth_failed(reply, challenge),
                extra_time=result.delay,
            )
            return
        self.session.auth_failed(reply, challenge)

    def _bearer_challenge(self, mechanism: str) -> bytes | None:
        """OAUTHBEARER / XOAUTH2 failures: the error challenge sent before the 535."""
        oauth = self.worker.config.oauth
        if mechanism not in ("OAUTHBEARER", "XOAUTH2") or oauth is None:
            return None
        return failure_challenge(mechanism, oauth.scope, oauth.issuer)

    # -------------------------------------------------------------- submission

    def _on_sender(self, event: SenderRequest) -> None:
        self.mail_since = self.worker.loop.time()
        account = self.account
        assert account is not None  # the session asks only once authenticated
        limits = self.worker.config.limits
        if limits.max_messages_per_session and (
            self.session.messages_accepted >= limits.max_messages_per_session
        ):
            self._refuse_sender(event, replies.SESSION_MESSAGES, "session_messages")
            return
        if limits.max_session_duration and (
            self.worker.loop.time() - self.opened > limits.max_session_duration
        ):
            self._refuse_sender(event, replies.SESSION_TOO_LONG, "session_duration")
            return
        self._with_valid_login(functools.partial(self._check_sender, event))

    def _with_valid_login(self, then: Callable[[], None]) -> None:
        """Go on with ``then`` if the login still holds; re-read it if an admin changed
        accounts or credentials since (the change signal, accounts/changes.py)."""
        credential = self.credential
        if credential is not None and not credential.is_active(time.time()):
            self._login_revoked("credential expired")
            return
        generation = self.worker.generation()
        account = self.account
        stale = account is not None and self.worker.logins.needs_recheck(account)  # [ldap]
        if generation == self.login_generation and not stale:
            then()
            return
        assert self.account is not None
        work = self.worker.logins.current(
            self.account.address, credential.id if credential is not None else None
        )
        self._decide(work, functools.partial(self._login_rechecked, generation, then))

    def _login_rechecked(
        self,
        generation: int,
        then: Callable[[], None],
        future: asyncio.Future[tuple[Account | None, Credential | None]],
    ) -> None:
        account, credential = future.result()
        before = self.account
        assert before is not None
        problem = login_problem(before, self.credential, account, credential, self.client_ip)
        if problem is not None:
            self._login_revoked(problem)
            return
        assert account is not None
        self.login = self.worker.submission.login(account, credential)
        self.login_generation = generation
        then()

    def _login_revoked(self, problem: str) -> None:
        account = self.account
        logs.event(
            "auth.revoked",
            logging.WARNING,
            session=self.session_id,
            client_ip=self.client_ip,
            user=account.address if account else None,
            credential=self.credential.name if self.credential else None,
            reason=problem,
            reply="530",
        )
        self.login = None
        self.session.logout(replies.login_revoked(problem))

    def _check_sender(self, event: SenderRequest) -> None:
        login = self.login
        assert login is not None
        submission = self.worker.submission
        refusal = submission.sender_refusal(login, event.address)
        if refusal is not None:
            self._refuse_sender(event, refusal.reply, refusal.reason)
            return
        work = submission.sender_limits(login)
        if work is None:
            self.new_recipients = []
            self.session.accept_sender()
            return
        self._decide(work, functools.partial(self._sender_checked, event))

    def _sender_checked(self, event: SenderRequest, future: asyncio.Future[bytes | None]) -> None:
        reply = future.result()
        if reply is not None:
            self._refuse_sender(event, reply, "quota")
            return
        self.new_recipients = []
        self.session.accept_sender()

    def _refuse_sender(self, event: SenderRequest, reply: bytes, reason: str) -> None:
        self.session.refuse(reply)
        self.metrics.message_refused(_SENDER_REFUSALS.get(reason, "limit"))
        logs.event(
            "mail.refused",
            session=self.session_id,
            client_ip=self.client_ip,
            user=self.account.address if self.account else None,
            mail_from=event.address,
            reason=reason,
            reply=replies.status(reply),
            text=replies.text(reply) if reason != "sender" else None,
        )

    def _on_recipient(self, event: RecipientRequest) -> None:
        login = self.login
        assert login is not None
        work = self.worker.submission.recipient_limits(
            login,
            event.address,
            accepted_so_far=len(self.session.recipients),
            new_so_far=len(self.new_recipients),
        )
        if work is None:
            self.session.accept_recipient()
            return
        self._decide(work, functools.partial(self._recipient_checked, event))

    def _recipient_checked(
        self, event: RecipientRequest, future: asyncio.Future[tuple[bytes | None, bool]]
    ) -> None:
        refusal, is_new = future.result()
        if refusal is None:
            if is_new:
                self.new_recipients.append(event.address)
            self.session.accept_recipient()
            return
        self.session.refuse(refusal)
        reason = self.worker.submission.refusal_reason(refusal)
        self.metrics.message_refused("limit" if reason == "quota" else "recipient_domain")
        logs.event(
            "rcpt.refused",
            session=self.session_id,
            client_ip=self.client_ip,
            user=self.account.address if self.account else None,
            rcpt=event.address,
            reason=reason,
            reply=replies.status(refusal),
            text=replies.text(refusal),
        )

    def _on_message(self, event: MessageReady) -> None:
        self._with_valid_login(functools.partial(self._accept_message, event))

    def _accept_message(self, event: MessageReady) -> None:
        login = self.login
        assert login is not None
        submission = self.worker.submission
        prepared = submission.prepare(
            login,
            Arrival(
                helo=self.session.helo_name,
                client_ip=self.client_ip,
                esmtp=self.session.esmtp,
                tls_version=self.tls_version,
                tls_cipher=self.tls_cipher,
            ),
            Envelope(event.mail_from, event.recipients, event.smtputf8, event.eight_bit),
            event.body,
            self.new_recipients,
        )
        if isinstance(prepared, Refusal):
            self.session.refuse(prepared.reply)
            self.metrics.message_refused("header_from")
            logs.event(
                "message.refused",
                session=self.session_id,
                client_ip=self.client_ip,
                user=login.account.address,
                mail_from=event.mail_from,
                reply=replies.status(prepared.reply),
                reason=replies.text(prepared.reply),
            )
            return
        self._decide(submission.accept(prepared), functools.partial(self._stored, prepared))

    def _stored(self, stored: SpooledMessage, future: asyncio.Future[None]) -> None:
        error = future.exception()
        if error is None:
            logs.event(
                "message.accepted",
                session=self.session_id,
                client_ip=self.client_ip,
                user=stored.account,
                queue_id=stored.id,
                mail_from=stored.mail_from,
                rcpts=len(stored.recipients),
                size=stored.size,
                credential=stored.credential,
                held=stored.status == "held" or None,  # the defence holds the account's mail
                reply="250",
            )
            self.session.message_queued(stored.id)
            since, self.mail_since = self.mail_since, None
            self.metrics.message_accepted(
                None if since is None else self.worker.loop.time() - since
            )
            if stored.size >= LARGE_BLOCK:
                release_memory_soon(self.worker.loop)
        else:
            reason = str(error) if isinstance(error, SpoolError) else repr(error)
            logs.event(
                "message.error",
                logging.ERROR,
                session=self.session_id,
                client_ip=self.client_ip,
                user=stored.account,
                reason=reason,
                reply="451",
            )
            self.session.refuse(replies.LOCAL_ERROR)
            self.metrics.message_refused("error")

    def _on_refused(self, event: Refused) -> None:
        if event.command in _TRANSACTION_COMMANDS:
            self.metrics.message_refused(_protocol_refusal(event.reply))
        level = logging.INFO if event.command in _LOGGED_REFUSALS else logging.DEBUG
        logs.event(
            "command.refused",
            level,
            session=self.session_id,
            client_ip=self.client_ip,
            command=event.command or None,
            reply=replies.status(event.reply),
        )

    async def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            new_transport = await self.worker.loop.start_tls(
                transport,
                self,
                self.worker.tls_context,
                server_side=True,
                ssl_handshake_timeout=self.worker.config.limits.tls_handshake_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, RuntimeError) as exc:
            logs.event(
                "tls.fail",
                logging.WARNING,
                session=self.session_id,
                client_ip=self.client_ip,
                reason=type(exc).__name__,
            )
            transport.abort()
            # A failed handshake never reaches connection_lost (the TLS layer had
            # taken the transport), so unregister here or the connection leaks.
            self._forget()
            return
        if new_transport is None or self.lost:
            self._forget()
            return
        self.transport = new_transport
        new_transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._reading = True  # a new transport reads from the start
        self.tls_version, self.tls_cipher = cipher_info(new_transport.get_extra_info("ssl_object"))
        self.metrics.tls_handshake(self.tls_version)
        logs.event(
            "tls",
            session=self.session_id,
            client_ip=self.client_ip,
            version=self.tls_version,
            cipher=self.tls_cipher,
        )
        self.session.tls_started()
        self.last_activity = self.worker.loop.time()
        self.waiting = False
        self._drive()

    # -------------------------------------------------------------- timers

    def check_timeouts(self, now: float) -> None:
        """Called about once a second by the worker's sweeper."""
        if self.lost:
            return
        limits = self.worker.config.limits
        if self.write_paused and now - self.write_paused_since > limits.command_timeout:
            # It stopped reading our replies: nothing we could send would arrive.
            logs.event(
                "timeout", session=self.session_id, client_ip=self.client_ip, reason="not_reading"
            )
            if self.transport is not None:
                self.transport.abort()
            return
        if self.waiting or self.session.state is State.WAITING:
            # A decision (database, hash, disk) must not hold a session forever either;
            # a TLS handshake has its own timeout (tls_handshake_timeout).
            if self.session.state is State.WAITING and now > self.decision_deadline:
                logs.event(
                    "timeout", session=self.session_id, client_ip=self.client_ip, reason="decision"
                )
                self._internal_error(TimeoutError("no decision within the command timeout"))
            return
        session = self.session
        if (
            limits.max_session_duration
            and now - self.opened > limits.max_session_duration
            and not session.in_message
        ):
            # However busy (a NOOP every minute), no connection lasts for ever.
            logs.event(
                "timeout", session=self.session_id, client_ip=self.client_ip, reason="duration"
            )
            session.end(replies.SESSION_TOO_LONG, "session too long")
            self._drive()
            return
        expired = now - self.last_activity > limits.idle_timeout
        if self.message_since is not None:
            expired = expired or now - self.message_since > limits.data_timeout
        elif self.partial_since is not None:
            expired = expired or now - self.partial_since > limits.command_timeout
        if expired:
            logs.event("timeout", session=self.session_id, client_ip=self.client_ip)
            self.session.timeout()
            self._drive()

    def drain(self, force: bool) -> None:
        """Shutdown: close now if idle between transactions, or when ``force``."""
        if self.lost:
            return
        session = self.session
        busy = self.waiting or session.state in (State.MAIL, State.RCPT) or session.in_message
        if force or not busy:
            if self.waiting:
                if self.transport is not None:
                    self.transport.abort()
                self._forget()  # a pending TLS handshake would never report the loss
                return
            session.shutdown()
            self._drive()
