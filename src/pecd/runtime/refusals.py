"""SMTP refusals as operators see them: every 4xx/5xx reply to MAIL, RCPT or DATA, and every 421
that closes a connection, at either SMTP point, becomes one :class:`~pecd.runtime.observe.Refusal`
(a mail log line, rate-limited, and ``pecd_smtp_refused_total``), as Postfix logs ``NOQUEUE:
reject:``. These happen before any trace event (a foreign sender, a domain not ours, too big, a
full disk, a drain), so the trace log's hook never sees them.

The SMTP class is the points' :class:`~pecd.runtime.smtp.IntakeSMTP` with two taps: the
transaction commands note what they were asked (the command, its argument, the envelope as it
stood), and each reply is looked at as it is sent. Nothing is decided here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, AnyStr

from aiosmtpd.smtp import Envelope

from pecd.clock import Clock
from pecd.runtime.observe import Refusal
from pecd.runtime.smtp import IntakeSMTP, Reply, peer_of

log = logging.getLogger(__name__)

#: The commands of a transaction, whose refusals are a message's (other commands' errors, a bad
#: AUTH say, are not a message refused: failed logins have their own counter).
TRANSACTION = ("MAIL", "RCPT", "DATA")
_MAX_ARG = 1000


def path_of(arg: str, keyword: str) -> str:
    """The address of a MAIL FROM / RCPT TO argument, as given (for the log, never trusted)."""
    rest = arg[:_MAX_ARG].strip()
    if rest[: len(keyword)].upper() == keyword:
        rest = rest[len(keyword) :].strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end] if end >= 0 else rest[1:]
    return rest.split(maxsplit=1)[0] if rest else ""


class ObservedSMTP(IntakeSMTP):
    """:class:`IntakeSMTP` that tells ``on_refusal`` of each refusal it sends (see the module)."""

    def __init__(
        self,
        handler: Any,
        *,
        on_refusal: Callable[[Refusal], None],
        point: str,
        clock: Clock,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.on_refusal = on_refusal
        self.point = point
        self.clock = clock
        # The transaction command being answered: (name, argument, envelope at its start).
        self.asked: tuple[str, str, Envelope | None] | None = None
        self._after_failure = False  # the next reply is the one for a command that raised
        for name in TRANSACTION:
            method = self._smtp_methods.get(name)
            if method is not None:
                self._smtp_methods[name] = self._noting(name, method)

    def _noting(self, name: str, method: Any) -> Any:
        async def command(arg: str) -> None:
            self.asked = (name, arg, self.envelope)
            done = False
            try:
                await method(arg)
                done = True
            finally:
                if done:
                    self.asked = None
                else:  # aiosmtpd answers it after (handle_exception): keep it for that reply
                    self._after_failure = True

        for attr in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            if hasattr(method, attr):
                setattr(command, attr, getattr(method, attr))
        return command

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and status[:1] in ("4", "5"):
            self._note(status)
        if self._after_failure:
            self._after_failure = False
            self.asked = None
        await super().push(status)

    def shut_down(self, *, now: bool = False) -> None:
        told = self.told
        super().shut_down(now=now)
        if self.told and not told:  # the 421 of a stop, written without push
            self._note(Reply.SHUTTING_DOWN)

    def _note(self, reply: str) -> None:
        asked = self.asked
        if asked is None and not reply.startswith("421"):
            return
        try:
            name, arg, envelope = asked or ("", "", None)
            session = self.session
            user = None
            if session is not None and session.authenticated:
                user = str(session.auth_data) if session.auth_data is not None else None
            sender = envelope.mail_from if envelope is not None else None
            recipients: tuple[str, ...] = ()
            if name == "MAIL":
                sender = path_of(arg, "FROM:")
            elif name == "RCPT":
                recipients = (path_of(arg, "TO:"),)
            elif envelope is not None:
                recipients = tuple(envelope.rcpt_tos)
            self.on_refusal(
                Refusal(
                    at=self.clock.now(),
                    point=self.point,
                    command=name,
                    client=peer_of(session) if session is not None else "",
                    user=user,
                    sender=sender,
                    recipients=recipients,
                    reply=reply,
                )
            )
        except Exception:  # the log must never cost a client its reply
            log.warning("an SMTP refusal was not logged", exc_info=True)
