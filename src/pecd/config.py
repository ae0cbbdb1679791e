"""The one TOML config file, validated into typed models; a bad file stops startup with one clear line."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from pecd.pec.address import normalize_address, normalize_domain, valid_address
from pecd.pec.size import parse_size
from pecd.pec.vocab import MIN_RECIPIENTS_GUARANTEED, MIN_RECIPIENTS_TIMES_SIZE


class ConfigError(Exception):
    """A config file pecd refuses to start on. ``str()`` is the one line to show."""


Size = Annotated[int, BeforeValidator(parse_size)]


def _address(value: str) -> str:
    value = normalize_address(value)
    if not valid_address(value):
        raise ValueError(f"{value!r} is not a mail address")
    return value


Address = Annotated[str, BeforeValidator(_address)]


class Endpoint(BaseModel):
    """``"host:port"``; an empty string disables the listener."""

    model_config = ConfigDict(frozen=True)
    host: str
    port: int = Field(ge=0, le=65535)

    @classmethod
    def parse(cls, value: Any) -> Endpoint | None:
        if value is None or value == "":
            return None
        if isinstance(value, Endpoint):
            return value
        if isinstance(value, dict):  # a config passed on as JSON (the mailbox process)
            return cls.model_validate(value)
        if not isinstance(value, str) or ":" not in value:
            raise ValueError(f"{value!r} is not host:port (example: 127.0.0.1:465)")
        host, _, port = value.rpartition(":")
        host = host.strip("[]")
        if not port.isdigit():
            raise ValueError(f"{value!r}: the port must be a number")
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


OptionalEndpoint = Annotated[Endpoint | None, BeforeValidator(Endpoint.parse)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Section):
    name: str = Field(min_length=1, description="gestore-emittente: the provider's name")
    domain: str = Field(min_length=3, description="mail domain used in PEC msgids")
    service_address: Address
    mail_receipt: Address
    local_domains: list[str] = Field(min_length=1)

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return normalize_domain(v)

    @field_validator("local_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return [normalize_domain(d) for d in v]


class SigningConfig(_Section):
    key: Path
    cert: Path
    chain: list[Path] = []
    # SHA-1 with the issuing CA included is the profile every real provider emits (Aruba, Sogei,
    # Namirial, up to the corpus's newest messages): a peer whose checks expect it would turn
    # anything else into anomalies. SHA-256 is the opt-in; both are always accepted on receipt.
    digest: Literal["sha256", "sha1"] = "sha1"


class TlsConfig(_Section):
    cert: Path
    key: Path
    ca: Path | None = None  # shown to users so they can trust a development certificate


class StorageConfig(_Section):
    data_dir: Path
    database_url: str = ""
    maildir_root: Path | None = None


_HOSTNAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?",
    re.ASCII,
)


class ListenersConfig(_Section):
    smtps: OptionalEndpoint = None  # access point, implicit TLS (465)
    submission: OptionalEndpoint = None  # access point, STARTTLS (587)
    imaps: OptionalEndpoint = None  # IMAP, implicit TLS (993)
    imap: OptionalEndpoint = None  # IMAP with STARTTLS (143), optional
    reception: OptionalEndpoint = None  # reception point for other providers (25), STARTTLS offered
    pop3s: OptionalEndpoint = None  # POP3, implicit TLS (995)
    pop3: OptionalEndpoint = None  # POP3 with STLS (110), optional, off by default
    https: OptionalEndpoint = None  # webmail and REST API (443), in the web process; off by default
    hostname: str = "localhost"  # the name shown to clients and in Received:

    @field_validator("hostname")
    @classmethod
    def _hostname_is_a_name(cls, value: str) -> str:
        # It goes into the SMTP greeting, EHLO and Received: a line break or a space there
        # would forge protocol lines.
        if len(value) > 253 or not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a host name (letters, digits, '-', '.')")
        return value


class LimitsConfig(_Section):
    max_message_size: Size = 100 * 1024 * 1024
    max_recipients: int = 500
    max_recipients_times_size: Size = 1024 * 1024 * 1024

    @model_validator(mode="after")
    def _legal_minimums(self) -> LimitsConfig:
        if self.max_recipients < MIN_RECIPIENTS_GUARANTEED:
            raise ValueError(
                f"max_recipients must be at least {MIN_RECIPIENTS_GUARANTEED} (DM 2 nov 2005 art. 12)"
            )
        if self.max_recipients_times_size < MIN_RECIPIENTS_TIMES_SIZE:
            raise ValueError(
                "max_recipients_times_size must be at least 30 MB (DM 2 nov 2005 art. 12)"
            )
        return self


class MailboxConfig(_Section):
    """Who serves the holders' mailboxes (IMAP, POP3) and how that process is kept alive.

    ``server = "pecd"``: pecd's own IMAP and POP3, in a process of their own supervised by
    ``pecd serve``. ``server = "dovecot"``: Dovecot serves IMAPS/POP3S over the same Maildir tree
    (``pecd init --mailbox-server dovecot`` writes its config); pecd opens no IMAP/POP3 listener.
    """

    server: Literal["pecd", "dovecot"] = "pecd"
    # The mailbox process answers a heartbeat every heartbeat_seconds; one silent for
    # heartbeat_timeout_seconds (an event loop stuck in a loop, a deadlock) is killed and replaced.
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    # 30 s: long enough for a command on a very large folder on a loaded machine.
    heartbeat_timeout_seconds: float = Field(default=30.0, gt=0)
    # Idle connections: before login (RFC 3501 leaves it to the server; about a minute) and after
    # (RFC 3501 5.4: at least 30 minutes; IDLE is re-armed by the client per RFC 2177).
    idle_timeout_unauthenticated: float = Field(default=60.0, gt=0)
    idle_timeout_authenticated: float = Field(default=1800.0, gt=0)
    # Largest literal accepted before login (RFC 7888 LITERAL-: 4096); after login the limit
    # is limits.max_message_size.
    max_literal_unauthenticated: int = Field(default=4096, ge=256)
    # Longest command line (without literals).
    max_line_length: int = Field(default=64 * 1024, ge=1024)


class SecurityConfig(_Section):
    """Login throttling and connection limits, on every listener that takes a password.

    Failures are counted per client address and per account over ``failure_window_seconds``.
    After ``delay_after_failures`` of them, each further login attempt waits
    ``delay_base_seconds`` doubled per failure, up to ``delay_max_seconds``; a connection with
    ``disconnect_after_failures`` failed logins is closed. At most ``max_hash_checks`` password
    hashes are checked at once in a process, so guessing cannot take every CPU from real logins.
    """

    delay_after_failures: int = Field(default=3, ge=0)
    delay_base_seconds: float = Field(default=0.5, ge=0)
    delay_max_seconds: float = Field(default=15.0, ge=0)
    disconnect_after_failures: int = Field(default=5, ge=1)
    failure_window_seconds: float = Field(default=900.0, gt=0)
    max_hash_checks: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1)
    # Connections at once from one client address, and in total, per listener.
    max_connections_per_address: int = Field(default=20, ge=1)
    max_connections: int = Field(default=1000, ge=1)


class QueueConfig(_Section):
    workers: int = Field(default=2, ge=1, le=64)
    batch: int = Field(default=16, ge=1, le=1000)  # jobs a worker claims and commits at once
    # Processes that build, sign and verify messages and write them into the Maildirs (0:
    # inline, in the server process). They wait on fsync too, so one more than the CPUs.
    format_processes: int = Field(
        default_factory=lambda: min(8, (os.cpu_count() or 1) + 1), ge=0, le=64
    )
    max_attempts: int = Field(default=10, ge=1)
    base_delay_seconds: float = Field(default=2.0, gt=0)
    max_delay_seconds: float = Field(default=600.0, gt=0)
    lease_seconds: float = Field(default=120.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    drain_seconds: float = Field(default=20.0, gt=0)  # on SIGTERM, then work in progress is cut
    # Each node (a running ``pecd serve``) beats every heartbeat_seconds in the ``nodes`` table;
    # on PostgreSQL the running jobs of a node silent for node_timeout_seconds are free to claim.
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    node_timeout_seconds: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _beats_within_timeout(self) -> QueueConfig:
        if self.node_timeout_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("node_timeout_seconds must be at least twice heartbeat_seconds")
        return self


class RelayConfig(_Section):
    """How pecd sends to other providers (and to ordinary mail servers, for esterno recipients)."""

    workers: int = Field(default=8, ge=1, le=256)
    port: int = Field(default=25, ge=1, le=65535)  # port of MX hosts found in DNS
    # "required": no delivery without verified TLS; "opportunistic": TLS when offered, checked
    # only if ca_bundle is set; "off": plain SMTP (tests only).
    starttls: Literal["required", "opportunistic", "off"] = "opportunistic"
    ca_bundle: Path | None = None  # CAs that peer certificates must chain to (default: system)
    max_per_destination: int = Field(default=4, ge=1, le=100)
    timeout_seconds: float = Field(default=60, gt=0)
    expire_hours: float = Field(default=24, gt=0)  # RFC 6109 2.2.2: no queue keeps mail longer


def _routes(value: Any) -> dict[str, Endpoint]:
    if not isinstance(value, dict):
        raise ValueError('routes is a table of domain = "host:port"')
    out: dict[str, Endpoint] = {}
    for domain, target in value.items():
        ep = Endpoint.parse(target)
        if ep is None:
            raise ValueError(f"route of {domain!r} is empty")
        out[normalize_domain(str(domain))] = ep
    return out


class IndexConfig(_Section):
    """The provider index (spec section 8): a local copy (``path``) or an LDAP directory
    (``source``), reloaded every ``reload_seconds`` and on SIGHUP."""

    path: Path | None = None  # LDIF, or a signed .p7m; without it only this provider is known
    trusted_signer: Path | None = None  # PEM certificate that must have signed a .p7m
    reload_seconds: float = Field(default=86400, gt=0)  # also reloaded on SIGHUP
    # The directory instead of a file: "ldap://host[:port]" or "ldaps://host[:port]".
    source: str | None = None
    base_dn: str | None = None  # default o=postacert
    bind_dn: str | None = None  # simple bind; anonymous when unset
    bind_password: str | None = None
    bind_password_file: Path | None = None  # read at each reload; one line, the password
    ca: Path | None = None  # CA file for ldaps:// or StartTLS (default: the system's)
    starttls: bool = False  # ldap:// upgraded with StartTLS before the bind
    timeout_seconds: float = Field(default=10, gt=0, le=600)  # connect, bind, search each

    @field_validator("source", "base_dn", "bind_dn", "bind_password", mode="before")
    @classmethod
    def _index_empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("source")
    @classmethod
    def _ldap_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from urllib.parse import urlsplit

        try:
            url = urlsplit(v.strip())
            port = url.port
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an LDAP URL: {exc}") from None
        if url.scheme.lower() not in ("ldap", "ldaps"):
            raise ValueError(
                f"{v!r}: must be an ldap:// or ldaps:// URL (a file copy goes in index.path)"
            )
        if not url.hostname:
            raise ValueError(f"{v!r}: the URL names no host (example: ldaps://ldap.example:636)")
        if url.path not in ("", "/") or url.query or url.fragment or url.username:
            raise ValueError(
                f"{v!r}: only scheme://host[:port]; the base DN goes in index.base_dn, "
                "the bind in index.bind_dn"
            )
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return f"{url.scheme.lower()}://{host}" + (f":{port}" if port else "") + "/"

    @model_validator(mode="after")
    def _index_source(self) -> IndexConfig:
        if self.source is None:
            ldap_only = [
                k
                for k in ("base_dn", "bind_dn", "bind_password", "bind_password_file", "ca")
                if getattr(self, k) is not None
            ] + (["starttls"] if self.starttls else [])
            if ldap_only:
                raise ValueError(
                    f"{', '.join(ldap_only)} only apply to an LDAP index: set index.source"
                )
            return self
        if self.path is not None:
            raise ValueError("set path (a file copy) or source (an LDAP directory), not both")
        if self.trusted_signer is not None:
            raise ValueError(
                "trusted_signer checks a signed file copy; an LDAP index is trusted through "
                "its TLS (ca) and bind"
            )
        ldaps = self.source.startswith("ldaps:")
        if ldaps and self.starttls:
            raise ValueError("starttls is for ldap:// URLs; ldaps:// is TLS already")
        if self.ca is not None and not (ldaps or self.starttls):
            raise ValueError("ca is used only with an ldaps:// source or starttls = true")
        if self.bind_password is not None and self.bind_password_file is not None:
            raise ValueError("set bind_password or bind_password_file, not both")
        has_password = self.bind_password is not None or self.bind_password_file is not None
        if has_password and not self.bind_dn:
            raise ValueError("a bind password needs bind_dn")
        if self.bind_dn and not has_password:
            raise ValueError(
                "bind_dn needs bind_password or bind_password_file (unset bind_dn to read "
                "anonymously)"
            )
        if has_password and not (ldaps or self.starttls):
            from urllib.parse import urlsplit

            host = (urlsplit(self.source).hostname or "").lower()
            if host not in ("localhost", "127.0.0.1", "::1"):
                raise ValueError(
                    "a bind password would cross the network in clear: use ldaps:// or "
                    "starttls = true (plain ldap:// with a password only to a loopback address)"
                )
        return self


class LogConfig(_Section):
    """The trace log (registro dei messaggi)."""

    seal_seconds: float = Field(default=60, gt=0)  # how often new events are sealed
    retention_months: int = Field(default=30)
    # The mail log (runtime/observe.py): one line per committed message event, as Postfix's log.
    # "" off, "-" standard output, else a file (appended; reopened when logrotate moves it);
    # "text" is key=value, "json" one object per line.
    mail_log: str = ""
    mail_log_format: Literal["text", "json"] = "text"

    @field_validator("retention_months")
    @classmethod
    def _thirty_months(cls, v: int) -> int:
        if v < 30:
            raise ValueError("must be at least 30: the log is kept 30 months (DPR 68/2005)")
        return v


class ServeConfig(_Section):
    """How ``pecd serve`` runs (runtime/supervisor.py, docs/operations.md "Several processes").

    ``processes``: SMTP + pipeline ("engine") processes sharing the SMTP listening sockets, each
    with its own workers and format processes. Unset: one per CPU on PostgreSQL, 1 on SQLite
    (one writer at a time is SQLite's limit: more processes only wait on each other). 1 keeps
    everything in the ``pecd serve`` process itself."""

    processes: Annotated[int, Strict()] | None = Field(default=None, ge=1, le=256)

    def engine_processes(self, database_url: str) -> int:
        """How many engine processes run on the database at ``database_url``."""
        if self.processes is not None:
            return self.processes
        if database_url.startswith(("postgresql", "postgres:")):
            return max(1, os.cpu_count() or 1)
        return 1


class MetricsConfig(_Section):
    """The operator port (runtime/metrics.py): Prometheus /metrics, /healthz, /readyz. Off when
    empty; keep it on loopback or a management network (it has no authentication)."""

    listen: OptionalEndpoint = None  # for example "127.0.0.1:9108"
    queue_cache_seconds: float = Field(default=5.0, ge=0, le=300)  # queue depth query reuse


class TimersConfig(_Section):
    first_hours: float = Field(default=12, gt=0)
    final_hours: float = Field(default=24, gt=0)
    check_seconds: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _window(self) -> TimersConfig:
        # The final notice must not go out before 22 h (RFC 6109 3.1.6) nor after 24 h.
        if not 22 <= self.final_hours <= 24:
            raise ValueError("final_hours must be between 22 and 24 (RFC 6109 3.1.6)")
        if self.first_hours >= self.final_hours:
            raise ValueError("first_hours must come before final_hours")
        return self


class WebhooksConfig(_Section):
    """Webhooks: a mailbox's transmission events POSTed to the URL its holder chose
    (``pecd.web.webhooks``)."""

    # The URL is the holder's choice: by default it may not lead into the provider's own network
    # (loopback, private, link-local, shared or reserved addresses, checked as resolved at send time).
    allow_private: bool = False
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    workers: int = Field(default=2, ge=1, le=64)
    max_attempts: int = Field(default=12, ge=1)  # then parked (pecd queue list / requeue)


class AntivirusConfig(_Section):
    """Virus scanning with ClamAV's daemon (clamd) at the access and the reception point.

    Off unless configured: an installation without a clamd keeps working (``pecd serve`` warns
    at startup that nothing is scanned); ``pecd init`` turns it on when clamd is installed. When
    on, a message is never accepted or delivered unscanned: while clamd cannot answer (down, slow,
    an error), the message waits and is retried (``on_unavailable = "wait"``, the only choice).
    """

    enabled: bool = False
    # Where clamd listens: its LocalSocket (a path), or its TCPSocket (host, port). One of them.
    socket: Path | None = None
    host: str = ""
    port: int = Field(default=3310, ge=1, le=65535)
    # One scan, from connecting to the verdict; past it the scan failed and is retried.
    timeout_seconds: float = Field(default=60.0, gt=0)
    # Largest message sent to clamd (default: limits.max_message_size; not less than it, since
    # a message that cannot be scanned is never accepted). clamd's StreamMaxLength must be at
    # least this.
    max_scan_size: Size | None = None
    on_unavailable: Literal["wait"] = "wait"
    # `pecd serve` starts clamd itself (clamd -c clamd_config, kept running, stopped on exit).
    managed: bool = False
    clamd_config: Path | None = None

    @field_validator("socket", "clamd_config", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("max_scan_size")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be more than 0")
        return v

    @model_validator(mode="after")
    def _where(self) -> AntivirusConfig:
        if self.socket is not None and self.host:
            raise ValueError("set socket (a unix socket) or host and port (TCP), not both")
        if self.enabled and self.socket is None and not self.host:
            raise ValueError(
                'enabled needs where clamd listens: socket = "/run/clamav/clamd.ctl"'
                ' or host = "127.0.0.1" (and port)'
            )
        if self.managed and self.clamd_config is None:
            raise ValueError("managed needs clamd_config: the clamd.conf pecd serve starts")
        return self


class Config(_Section):
    provider: ProviderConfig
    signing: SigningConfig
    tls: TlsConfig
    storage: StorageConfig
    listeners: ListenersConfig = ListenersConfig()
    limits: LimitsConfig = LimitsConfig()
    queue: QueueConfig = QueueConfig()
    mailbox: MailboxConfig = MailboxConfig()
    security: SecurityConfig = SecurityConfig()
    timers: TimersConfig = TimersConfig()
    relay: RelayConfig = RelayConfig()
    index: IndexConfig = IndexConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    serve: ServeConfig = ServeConfig()
    antivirus: AntivirusConfig = AntivirusConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    # Static routes: recipient domain -> "host:port", used before DNS (tests, private links).
    routes: Annotated[dict[str, Endpoint], BeforeValidator(_routes)] = {}
    source: Path | None = None

    @model_validator(mode="after")
    def _scan_size(self) -> Config:
        size = self.antivirus.max_scan_size
        if size is not None and size < self.limits.max_message_size:
            raise ValueError(
                f"antivirus.max_scan_size ({size}) must be at least limits.max_message_size"
                f" ({self.limits.max_message_size}): a message that cannot be scanned is never"
                " accepted"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{self.storage.data_dir / 'pecd.db'}"

    @property
    def processes(self) -> int:
        """The engine processes ``pecd serve`` runs (``[serve] processes``, resolved)."""
        return self.serve.engine_processes(self.database_url)

    @property
    def maildir_root(self) -> Path:
        return self.storage.maildir_root or self.storage.data_dir / "mail"


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file's own directory."""
    for section, keys in {
        "signing": ("key", "cert"),
        "tls": ("cert", "key", "ca"),
        "storage": ("data_dir", "maildir_root"),
        "relay": ("ca_bundle",),
        "index": ("path", "trusted_signer", "ca", "bind_password_file"),
        "antivirus": ("socket", "clamd_config"),
    }.items():
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        for k in keys:
            if isinstance(sec.get(k), str):
                sec[k] = str((base / sec[k]).resolve()) if sec[k] else sec[k]
        if section == "signing" and isinstance(sec.get("chain"), list):
            sec["chain"] = [
                str((base / c).resolve()) if isinstance(c, str) else c for c in sec["chain"]
            ]
    storage = data.get("storage")
    if isinstance(storage, dict):
        url = storage.get("database_url")
        if (
            isinstance(url, str)
            and url.startswith("sqlite:///")
            and not url.startswith("sqlite:////")
        ):
            storage["database_url"] = "sqlite:///" + str(
                (base / url[len("sqlite:///") :]).resolve()
            )


def _describe(exc: ValidationError, path: Path) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "extra_forbidden":
        msg = "is not a known key"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{path}: {key}: {msg}{more}"


# ``${NAME}`` or ``${NAME:-default}`` in a string value; ``$${...}`` stays a literal ``${...}``.
_ENV_REF = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, key: str, path: Path) -> Any:
    """``value`` (a TOML value at ``key``) with the environment's values put in its strings:
    ``${NAME}`` must be set, ``${NAME:-default}`` takes ``default`` when NAME is unset or empty.
    One file then serves several places (docker-compose.yml's containers, a native run of the
    same topology: docs/operations.md "Compose topology"). Keys are never expanded."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else k, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, key, path) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        escaped, name, default = m.groups()
        if escaped:
            return m.group(0)[1:]
        if default is not None and "${" in default:
            raise ConfigError(
                f"{path}: {key}: ${{{name}:-...}} has a ${{...}} in its default; only "
                "${NAME} and ${NAME:-default} with a plain default are expanded"
            )
        found = os.environ.get(name)
        if default is not None and not found:
            return default
        if found is None:
            raise ConfigError(
                f"{path}: {key}: environment variable {name} is not set"
                f" (${{{name}:-default}} gives it a default)"
            )
        return found

    expanded = _ENV_REF.sub(sub, value)
    if "${" in _ENV_REF.sub("", value):
        # A form not expanded (``${A-x}``, ``${A:=x}``, an unclosed ``${``): an error, not a
        # literal that would surface later as a strange path or address.
        raise ConfigError(
            f"{path}: {key}: a ${{...}} that is not ${{NAME}} or ${{NAME:-default}}"
            " (write $${ for a literal ${)"
        )
    return expanded


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise ConfigError with one line naming the file, key and problem."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = _expand_env(data, "", path)
    _resolve_paths(data, path.resolve().parent)
    data["source"] = str(path.resolve())
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    for label, p in (
        ("signing.key", cfg.signing.key),
        ("signing.cert", cfg.signing.cert),
        ("tls.cert", cfg.tls.cert),
        ("tls.key", cfg.tls.key),
    ):
        if not p.is_file():
            raise ConfigError(f"{path}: {label}: file {p} does not exist")
    if cfg.provider.domain not in cfg.provider.local_domains:
        raise ConfigError(f"{path}: provider.local_domains must include provider.domain")
    return cfg
