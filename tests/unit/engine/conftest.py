"""Playbooks for the engine's stages: a stage is driven by hand, each command it yields answered
by an in-memory fake (real builders and real verification, no socket, file or database), and what
it yields and returns is there to assert on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest

from helpers import PKI_NOW
from pecd.engine.context import Context, Rules
from pecd.engine.effects import (
    CLEAN,
    Build,
    ClaimNotice,
    Classify,
    Command,
    Deliver,
    Effect,
    Enqueue,
    History,
    Logged,
    LookUpMailboxes,
    MailboxState,
    Scan,
    Scanned,
    Send,
    Sent,
    Stage,
    TakeInCharge,
    TakenInCharge,
    play,
)
from pecd.engine.vocab import DELIVERED, Outcome, TraceType
from pecd.pec.builders import ProviderIdentity
from pecd.pec.checks import SubmissionLimits
from pecd.pec.classify import classify
from pecd.pec.pki import create_dev_pki
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time

OURS = "pec.ours.test"
THEIRS = "pec.theirs.test"
NOW = PKI_NOW + timedelta(days=30)  # inside the development certificates' validity


def identity(domain: str, name: str) -> ProviderIdentity:
    pki = create_dev_pki(domain=domain, name=name, now=PKI_NOW)
    return ProviderIdentity(
        name=name,
        domain=domain,
        service_address=f"posta-certificata@{domain}",
        signer=KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem),
    )


@dataclass(frozen=True)
class Entry:
    mail_receipt: str
    domains: tuple[str, ...] = ()


@dataclass
class Index:
    """The provider index: certified domains, and signer certificates (DER) -> entry."""

    domains: set[str] = field(default_factory=set)
    signers: dict[bytes, Entry] = field(default_factory=dict)

    def is_certified(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.domains

    def provider_for_certificate(self, der: bytes) -> Entry | None:
        return self.signers.get(der)


RULES = Rules(
    limits=SubmissionLimits(
        max_size=10 * 1024 * 1024, max_recipients=50, max_recipients_times_size=100 * 1024 * 1024
    ),
    max_attempts=5,
    relay_expire_hours=24,
    base_delay_seconds=60,
    max_delay_seconds=3600,
    first_hours=12,
    final_hours=24,
)


@dataclass
class World:
    """What the fakes answer: mailboxes, sent transmissions, Maildir outcomes, SMTP results."""

    provider: ProviderIdentity
    mailboxes: dict[str, MailboxState] = field(default_factory=dict)
    sent: dict[str, str] = field(default_factory=dict)  # pec msgid -> sender
    sent_to: dict[str, tuple[str, ...]] = field(default_factory=dict)  # pec msgid -> recipients
    log: list[tuple[str, Logged]] = field(default_factory=list)  # (pec msgid, event) received
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # mailbox -> outcome
    smtp: Sent = field(default_factory=Sent)
    scanned: Scanned = CLEAN  # what the antivirus says of everything...
    virus: bytes | None = None  # ...unless set: then infected exactly where these bytes are
    fail_builds: Callable[[Build], bool] = lambda b: False
    commands: list[Command] = field(default_factory=list)
    now: datetime = NOW
    receipts_at: datetime = NOW + timedelta(seconds=1)

    def answer(self, cmd: Command) -> Any:
        if isinstance(cmd, Build):
            if self.fail_builds(cmd):
                raise ValueError("this build fails")
            return [call(provider=self.provider) for call in cmd.calls]
        if isinstance(cmd, Classify):
            return classify(cmd.raw)
        if isinstance(cmd, LookUpMailboxes):
            return {a: self.mailboxes.get(a) for a in cmd.addresses}
        if isinstance(cmd, History):
            sent = [
                Logged(
                    TraceType.POSTA_CERTIFICATA,
                    self.sent[cmd.pec_msgid],
                    self.sent_to.get(cmd.pec_msgid, ()),
                    {},
                )
                for _ in (1,)
                if cmd.pec_msgid in self.sent
            ]
            earlier = [e for m, e in self.log if m == cmd.pec_msgid]
            return tuple(e for e in [*sent, *earlier] if e.event in cmd.types)
        if isinstance(cmd, Deliver):
            return [self.outcomes.get(d.mailbox, DELIVERED) for d in cmd.items]
        if isinstance(cmd, Send):
            return self.smtp
        if isinstance(cmd, Scan):
            if self.virus is not None:
                return Scanned(True, "Pecd.Test.Signature") if self.virus in cmd.data else CLEAN
            return self.scanned
        if isinstance(cmd, TakeInCharge):
            c = classify(cmd.envelope)
            if not c.is_valid_pec:
                return TakenInCharge(c)
            outcomes = tuple(self.outcomes.get(d.mailbox, DELIVERED) for d in cmd.deliveries)
            when = pec_time(self.receipts_at)
            answered = cmd.answer(c, outcomes, when)
            presa = cmd.presa(provider=self.provider)
            if answered.failed:
                return TakenInCharge(c, outcomes, presa, (), answered.failed)
            receipts = tuple(
                (r, e, call(provider=self.provider), err) for r, e, call, err in answered.receipts
            )
            return TakenInCharge(c, outcomes, presa, receipts, {}, when)
        raise AssertionError(f"unexpected command {cmd!r}")

    @staticmethod
    def of(effects: Sequence[Effect], kind: type[Any]) -> list[Any]:
        """The effects of one type, in order, those that take effect only after another
        (``then``) included."""
        out: list[Any] = []
        for e in effects:
            if isinstance(e, kind):
                out.append(e)
            if isinstance(e, Enqueue | ClaimNotice):
                out += World.of(e.then, kind)
        return out

    def play(self, stage: Stage) -> list[Effect]:
        """Drive ``stage`` to its end; its commands are kept in ``commands``."""

        def answer(cmd: Command) -> Any:
            self.commands.append(cmd)
            return self.answer(cmd)

        return play(stage, answer)


@pytest.fixture(scope="session")
def ours() -> ProviderIdentity:
    return identity(OURS, "Gestore Nostro")


@pytest.fixture(scope="session")
def theirs() -> ProviderIdentity:
    return identity(THEIRS, "Gestore Altrui")


@pytest.fixture
def index(theirs: ProviderIdentity) -> Index:
    from cryptography.hazmat.primitives import serialization

    der = theirs.signer.certificate.public_bytes(serialization.Encoding.DER)
    return Index({THEIRS}, {der: Entry(f"posta-certificata@{THEIRS}", (THEIRS,))})


@pytest.fixture
def ctx(ours: ProviderIdentity, index: Index) -> Context:
    return Context(
        provider=ours,
        local_domains=frozenset({OURS}),
        mail_receipt=f"posta-certificata@{OURS}",
        rules=RULES,
        index=index,
    )


@pytest.fixture
def world(ours: ProviderIdentity) -> World:
    return World(ours)
