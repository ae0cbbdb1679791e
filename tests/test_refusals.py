"""runtime/refusals.py: which SMTP replies are refusals the mail log tells of, and what of the
session each one names, on a real socket on loopback (the SMTP class of both points with a small
handler; the points' own refusals are in tests/test_observe.py)."""

from __future__ import annotations

import asyncio
import smtplib
from datetime import UTC, datetime
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from pecd.clock import FixedClock
from pecd.config import SecurityConfig
from pecd.guard import Guard
from pecd.runtime.observe import Refusal
from pecd.runtime.refusals import ObservedSMTP
from pecd.runtime.smtp import Reply, Sessions

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


class Handler:
    """MAIL from boom@… fails (the store down, say): aiosmtpd answers it 451 after the command
    raised; RCPT is refused for every domain but ours."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.startswith("boom@"):
            raise RuntimeError("the store is down")
        envelope.mail_from = address
        return Reply.OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not address.endswith("@pec.ours.test"):
            return Reply.RELAY_DENIED
        envelope.rcpt_tos.append(address)
        return Reply.RCPT_OK


def test_transaction_refusals_and_connection_refusals_are_told_and_nothing_else() -> None:
    seen: list[Refusal] = []
    guard = Guard(SecurityConfig(max_connections_per_address=1))
    sessions = Sessions()

    def factory() -> ObservedSMTP:
        return ObservedSMTP(
            Handler(),
            on_refusal=seen.append,
            point="reception",
            clock=FixedClock(T0),
            hostname="mx.pec.ours.test",
            decode_data=False,
            guard=guard,
            sessions=sessions,
            listener="reception",
        )

    def client(port: int) -> list[Any]:
        replies: list[Any] = []
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("mx.esterno.example")
            replies.append(smtp.mail("boom@esterno.example")[0])  # 451: the command raised
            replies.append(smtp.docmd("FOO")[0])  # 500: not a transaction's refusal
            replies.append(smtp.mail("mario@esterno.example")[0])
            replies.append(smtp.rcpt("x@altrove.example")[0])  # 550: not our domain
            replies.append(smtp.rcpt("bob@pec.ours.test")[0])
            replies.append(smtp.noop()[0])
            code, text = smtp.docmd("HELP", "RCPT")  # the commands tapped keep their syntax
            replies.append((code, b"RCPT TO" in text))
            # A second connection from the same address, one too many: 421 before the greeting.
            try:
                smtplib.SMTP("127.0.0.1", port, timeout=30).quit()
            except smtplib.SMTPConnectError as e:
                replies.append(e.smtp_code)
        return replies

    async def main() -> list[Any]:
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.to_thread(client, port)
        finally:
            server.close()
            await sessions.shut_down(grace=1)
            await server.wait_closed()

    assert asyncio.run(main()) == [451, 500, 250, 550, 250, 250, (250, True), 421]
    told = [(r.command, r.sender, r.recipients, r.reply[:9]) for r in seen]
    assert told == [
        ("MAIL", "boom@esterno.example", (), "451 4.3.0"),
        ("RCPT", "mario@esterno.example", ("x@altrove.example",), "550 5.7.1"),
        ("", None, (), "421 4.7.0"),
    ]
    assert all(
        (r.at, r.point, r.client, r.user) == (T0, "reception", "127.0.0.1", None) for r in seen
    )
