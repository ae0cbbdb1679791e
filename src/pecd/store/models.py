"""The database schema: accounts, the durable job queue, the trace log, Maildir delivery records.

Every datetime column is an aware UTC datetime on both backends (see :class:`UTCDateTime`).
The schema is created by the Alembic revisions in the top-level ``migrations/`` folder; a test
checks that ``migrate()`` yields exactly this metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

from pecd.pec.address import normalize_address, normalize_domain

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Job states. ``ready``: waiting for ``next_run_at``; ``running``: claimed by ``locked_by`` until
#: ``locked_until``; ``done``: finished (its bytes are freed); ``parked``: failed too many times.
JOB_STATES: tuple[str, ...] = ("ready", "running", "done", "parked")

# 64-bit ids on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the autoincrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: values are stored as naive UTC
    (so that text comparison is time comparison) and come back with ``tzinfo=UTC``. Naive datetimes
    are refused on the way in: they are always a bug here (time comes from the injected clock).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pecd stores aware UTC datetimes")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it as a class attribute)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        bytes: LargeBinary(),
    }


def table_of(model: type[Base]) -> Table:
    """The Core ``Table`` of a mapped class, for Core statements on hot paths (the ORM's
    unit of work costs more than the rows). SQLAlchemy types ``__table__`` as any FromClause;
    every model here is mapped to one plain Table."""
    table = model.__table__
    assert isinstance(table, Table), model
    return table


class Domain(Base):
    """A mail domain served by this provider. ``name`` is lowercase."""

    __tablename__ = "domains"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime]

    @validates("name")
    def _lower_name(self, _key: str, value: str) -> str:
        return normalize_domain(value)

    def __repr__(self) -> str:
        return f"Domain({self.name!r})"


class Mailbox(Base):
    """A PEC mailbox. ``address`` is lowercase; ``password_hash`` is an argon2id hash."""

    __tablename__ = "mailboxes"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), ForeignKey("domains.name"), index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]

    @validates("address", "domain")
    def _lower(self, key: str, value: str) -> str:
        return normalize_address(value) if key == "address" else normalize_domain(value)

    def __repr__(self) -> str:
        return f"Mailbox({self.address!r}, disabled={self.disabled})"


class Job(Base):
    """One unit of durable work (a pipeline stage, a delivery, a relay attempt).

    ``key`` is the idempotency key: enqueueing the same key twice creates one job. ``data`` holds
    the message bytes until the job is done, so that a job and its message commit together.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_next_run_at", "state", "next_run_at"),
        CheckConstraint("state IN ('ready', 'running', 'done', 'parked')", name="state"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String, unique=True)
    state: Mapped[str] = mapped_column(String(16), default="ready")
    payload: Mapped[dict[str, Any]]
    data: Mapped[bytes | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_run_at: Mapped[datetime]
    locked_by: Mapped[str | None] = mapped_column(String(255))
    locked_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # The node (``nodes.id``) whose worker holds the lease: on PostgreSQL a running job whose
    # node stopped beating is free before ``locked_until`` (see pecd.store.nodes).
    leased_by: Mapped[str | None] = mapped_column(String(32))

    def __repr__(self) -> str:
        return f"Job(id={self.id}, kind={self.kind!r}, key={self.key!r}, state={self.state!r})"


class Node(Base):
    """A running ``pecd serve`` process (a node), with a random ``id`` per start. It updates
    ``heartbeat_at`` (the database's clock) every few seconds and deletes its row when it stops
    cleanly; a row that stops beating is a dead node (see pecd.store.nodes)."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]

    def __repr__(self) -> str:
        return f"Node({self.id!r}, {self.hostname}:{self.pid})"


class TraceEvent(Base):
    """One event of the trace log ("log dei messaggi"). Append-only by convention: nothing in
    pecd updates or deletes a row except the retention purge of whole sealed ranges."""

    __tablename__ = "trace_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    event: Mapped[str] = mapped_column(String(64))
    pec_msgid: Mapped[str | None] = mapped_column(String, index=True)
    client_msgid: Mapped[str | None] = mapped_column(String, index=True)
    sender: Mapped[str | None] = mapped_column(String(320), index=True)
    recipients: Mapped[list[Any]]
    subject: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(String)
    generated_ids: Mapped[list[Any]]
    error: Mapped[str | None] = mapped_column(Text)
    daticert: Mapped[dict[str, Any] | None]
    data: Mapped[dict[str, Any] | None]
    node: Mapped[str | None] = mapped_column(String(255))
    # The seal that covers this event (NULL until the sealer gets to it).
    seal_id: Mapped[int | None] = mapped_column(BigInteger, index=True)

    def __repr__(self) -> str:
        return f"TraceEvent(id={self.id}, event={self.event!r}, pec_msgid={self.pec_msgid!r})"


class TraceSeal(Base):
    """A signed seal over the events whose ``seal_id`` is this seal, chained to the previous one.

    ``digests`` lists (event id, SHA-256 of the event) in id order, 40 bytes each, so that a
    verification can name each event changed, inserted or deleted; ``seal_hash`` is the SHA-256
    of the seal's canonical content, which includes ``prev_hash`` (the previous seal's
    ``seal_hash``) and the SHA-256 of ``digests``; ``signature`` is the provider key's
    signature over that content."""

    __tablename__ = "trace_seals"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime]
    node: Mapped[str | None] = mapped_column(String(255))
    first_event: Mapped[int | None] = mapped_column(BigInteger)
    last_event: Mapped[int | None] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    digests: Mapped[bytes]
    prev_hash: Mapped[str] = mapped_column(String(64))
    seal_hash: Mapped[str] = mapped_column(String(64))
    signer_sha1: Mapped[str] = mapped_column(String(40))
    signature: Mapped[bytes]


class TraceSigner(Base):
    """A certificate that signed seals, by its SHA-1 (seals keep only the hash)."""

    __tablename__ = "trace_signers"

    sha1: Mapped[str] = mapped_column(String(40), primary_key=True)
    certificate: Mapped[bytes]
    created_at: Mapped[datetime]


class Expectation(Base):
    """What one PEC recipient at another provider still owes for one transmission: a presa in
    carico and a delivery receipt. The 12 h / 24 h timers read it (spec section 2.3); a row is
    closed by the delivery receipt, an error notice, or the final timeout notice."""

    __tablename__ = "expectations"
    __table_args__ = (Index("ix_expectations_closed_at_sent_at", "closed_at", "sent_at"),)

    pec_msgid: Mapped[str] = mapped_column(String, primary_key=True)
    recipient: Mapped[str] = mapped_column(String(320), primary_key=True)
    sender: Mapped[str] = mapped_column(String(320))
    tx: Mapped[dict[str, Any]]
    sent_at: Mapped[datetime]
    presa_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    first_notice_at: Mapped[datetime | None]
    final_notice_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"Expectation({self.pec_msgid!r}, {self.recipient!r}, closed={self.closed_at})"


class TraceHorizon(Base):
    """Where the log begins after a retention purge: the last seal removed and its hash, signed,
    so that the first seal still kept must follow it (one row, ``id`` = 1)."""

    __tablename__ = "trace_horizon"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_seal: Mapped[int] = mapped_column(BigInteger)
    last_seal_hash: Mapped[str] = mapped_column(String(64))
    purged_at: Mapped[datetime]
    events_purged: Mapped[int] = mapped_column(BigInteger)
    signer_sha1: Mapped[str] = mapped_column(String(40))
    signature: Mapped[bytes]


class InfectedMessage(Base):
    """An infected message the antivirus stopped at the access or reception point, kept
    byte-exact (``data``, with its size and SHA-256) with what the trace log says of it, for as
    long as the trace log keeps its events (``log.retention_months``). ``key`` makes a stage
    that runs again keep it once."""

    __tablename__ = "virus_store"
    __table_args__ = (CheckConstraint("point IN ('access', 'reception')", name="point"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String, unique=True)
    at: Mapped[datetime] = mapped_column(index=True)
    point: Mapped[str] = mapped_column(String(16))
    signature: Mapped[str] = mapped_column(Text)
    pec_msgid: Mapped[str | None] = mapped_column(String, index=True)
    sender: Mapped[str | None] = mapped_column(String(320))
    recipients: Mapped[list[Any]]
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes]

    def __repr__(self) -> str:
        return f"InfectedMessage(id={self.id}, point={self.point!r}, signature={self.signature!r})"


class ApiToken(Base):
    """A REST API token of one mailbox. Only the SHA-256 of the token is kept (``token_sha256``,
    hex): the token itself is shown once, when it is made. A revoked token stays, for the list."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    mailbox: Mapped[str] = mapped_column(String(320), index=True)
    name: Mapped[str] = mapped_column(String(255))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"ApiToken(id={self.id}, mailbox={self.mailbox!r}, name={self.name!r})"


# --- Issue 13: the accounts' second factor and app passwords, web sessions, webhooks. ---


class MailboxSecurity(Base):
    """A mailbox's login settings beside its password (one row per mailbox that has any).

    ``totp_secret`` is the base32 TOTP secret: while ``totp_enabled_at`` is None it is an
    enrolment not yet confirmed by a code. ``totp_last_step`` is the last time step accepted
    (a code is good once). ``totp_required``: the mailbox may not log in on the web without a
    second factor, and mail clients must use app passwords (the per-mailbox switch).

    ``totp_failures`` counts the codes tried since the last right one (every node adds to the
    same count: a guesser cannot spread over processes or addresses); while
    ``totp_locked_until`` is in the future no code is checked at all
    (``pecd.store.security``). ``totp_pending_owner``: the SHA-256 (hex) of the web session that
    began the enrolment pending, the only one that may see and confirm its secret (None: begun
    elsewhere, e.g. on the command line)."""

    __tablename__ = "mailbox_security"

    mailbox: Mapped[str] = mapped_column(String(320), primary_key=True)
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    totp_enabled_at: Mapped[datetime | None]
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    totp_required: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime]
    totp_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    totp_locked_until: Mapped[datetime | None]
    totp_pending_owner: Mapped[str | None] = mapped_column(String(64))


class AppPassword(Base):
    """A password for one mail client of a mailbox (IMAP, POP3, SMTP), kept as an argon2id
    hash. Shown once when made; a revoked one stays, for the list."""

    __tablename__ = "app_passwords"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    mailbox: Mapped[str] = mapped_column(String(320), index=True)
    name: Mapped[str] = mapped_column(String(255))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class WebSession(Base):
    """A webmail session. Only the SHA-256 of the cookie's value is kept (``id_sha256``, hex).
    ``stage`` is ``password`` while a second factor is still owed, ``ok`` once logged in."""

    __tablename__ = "web_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(320), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    peer: Mapped[str | None] = mapped_column(String(64))


class Webhook(Base):
    """Where a mailbox's transmission events are POSTed (accepted, delivered, failed), signed
    with HMAC-SHA256 under ``secret``. One per mailbox."""

    __tablename__ = "webhooks"

    mailbox: Mapped[str] = mapped_column(String(320), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
