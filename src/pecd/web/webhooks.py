"""Sending webhook events: the WEBHOOK jobs that ``pecd.store.webhooks`` queues, POSTed by the
worker pool to the URL of the sender's mailbox.

What a receiver gets
--------------------
A POST with a JSON body (the event: ``id``, ``type`` accepted / not-accepted / delivered /
failed, ``mailbox``, ``transmission`` (the API's id), ``pec_msgid``, ``client_msgid``,
``recipient``, ``recipients``, ``at``, ``error``) and the headers:

* ``X-Pecd-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the secret>``:
  the receiver recomputes it over the body bytes as received, compares in constant time, and
  refuses a ``t`` too far from its clock (a replay);
* ``X-Pecd-Event-Id``: the event's id (also ``id`` in the body): the same event may come twice
  (a 2xx lost on the way back is retried), the receiver keeps the ids it has seen;
* ``X-Pecd-Event``: the event's type.

Any 2xx is success; anything else (a redirect too: none is followed), a timeout or a connection
failure is a failed attempt, retried with backoff by the queue until parked.

The URL is chosen by a mailbox holder, so by default it may not lead into the provider's own
network (``[webhooks] allow_private = false``): the host is resolved at send time, every address
that is not globally routable (loopback, private, link-local, shared, reserved, multicast) is
discarded, and the connection goes to a checked address (the URL's host still names the TLS
server and the ``Host`` header), so a name that resolves differently on a second look
gets nowhere else. No proxy from the environment is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from pecd.config import Config
from pecd.store.db import Database
from pecd.store.webhooks import get_webhook

__all__ = [
    "EVENT_HEADER",
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "WebhookFailed",
    "check_url",
    "deliver",
    "is_public",
    "post_event",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Pecd-Signature"
EVENT_ID_HEADER = "X-Pecd-Event-Id"
EVENT_HEADER = "X-Pecd-Event"
_MAX_URL = 2048
_MAX_ADDRESSES = 4  # tried in turn when a connection fails


class WebhookFailed(Exception):
    """An attempt that did not get a 2xx (the message says why, for ``pecd queue list``)."""


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP address) is globally routable: not loopback, private,
    link-local, shared (100.64/10), reserved, unspecified or multicast."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def check_url(url: str, *, allow_private: bool) -> str:
    """``url`` if it can be a webhook's URL, else ValueError saying why: http or https, a host,
    no user name or password, no fragment, at most 2048 characters on one line; without
    ``allow_private`` not an address (or ``localhost``) that is not public."""
    if not url or len(url) > _MAX_URL:
        raise ValueError(f"a webhook URL has 1 to {_MAX_URL} characters")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("a webhook URL is ASCII without spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("a webhook URL begins with https:// or http://")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("a webhook URL carries no user name or password")
    if parts.fragment or "#" in url:
        raise ValueError("a webhook URL has no #fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("a webhook URL's port must be a number from 1 to 65535") from None
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("a webhook URL names a host")
    if not allow_private:
        literal = _literal(host)
        if (literal is not None and not is_public(literal)) or (
            host == "localhost" or host.endswith(".localhost")
        ):
            raise ValueError(
                f"{host} is not a public address (the operator's webhooks.allow_private is off)"
            )
    return url


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Pecd-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode("utf-8"), b"%d." % timestamp + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """What a receiver does (shown here for its documentation and used by pecd's tests): the
    signature is ours over ``body`` and its time within ``tolerance`` seconds of ``now``."""
    fields = dict(p.partition("=")[::2] for p in header.split(","))
    t = fields.get("t", "")
    if not t.isdigit() or abs(now - int(t)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, int(t), body), f"t={t},v1={fields.get('v1', '')}")


async def _addresses(host: str, port: int, allow_private: bool) -> list[str]:
    """The addresses ``host`` may be reached at, public ones only unless ``allow_private``."""
    literal = _literal(host)
    if literal is not None:
        found = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise WebhookFailed(f"cannot resolve {host}: {exc}") from None
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
    allowed = [a for a in found if allow_private or is_public(a)]
    if not allowed:
        raise WebhookFailed(
            f"refused: {host} is {', '.join(found)}, not a public address"
            " (the operator's webhooks.allow_private is off)"
        )
    return allowed[:_MAX_ADDRESSES]


def _body(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


async def post_event(
    url: str,
    secret: str,
    event: Mapping[str, Any],
    *,
    now: datetime,
    timeout: float,
    allow_private: bool,
) -> int:
    """POST ``event`` to ``url``, signed with ``secret``; the status (a 2xx), else WebhookFailed."""
    try:
        # The form only: where it leads is checked on the addresses it resolves to, below.
        check_url(url, allow_private=True)
    except ValueError as exc:
        raise WebhookFailed(f"refused: {exc}") from None
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    body = _body(event)
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "User-Agent": "pecd-webhook/1",
        SIGNATURE_HEADER: sign(secret, int(now.timestamp()), body),
        EVENT_ID_HEADER: str(event.get("id", "")),
        EVENT_HEADER: str(event.get("type", "")),
    }
    target = httpx.URL(url)
    last: Exception | None = None
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False
    ) as client:
        for address in await _addresses(host, port, allow_private):
            request = client.build_request(
                "POST",
                target.copy_with(host=address),
                headers=headers,
                content=body,
                extensions={"sni_hostname": host} if https else {},
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last = exc
                continue
            except httpx.HTTPError as exc:
                raise WebhookFailed(f"{type(exc).__name__} from {host}: {exc}") from None
            await response.aclose()
            if not 200 <= response.status_code < 300:
                raise WebhookFailed(f"HTTP {response.status_code} from {host}")
            return response.status_code
    raise WebhookFailed(f"cannot connect to {host} port {port}: {last}")


async def deliver(cfg: Config, db: Database, payload: Mapping[str, Any], now: datetime) -> None:
    """Run one WEBHOOK job: POST its event to its mailbox's webhook as set now (a webhook
    removed since: nothing to send). Raises WebhookFailed for the queue to retry."""
    mailbox = str(payload.get("mailbox", ""))
    event = payload.get("event")
    if not isinstance(event, Mapping):
        raise WebhookFailed("a webhook job without its event")
    hook = await get_webhook(db, mailbox)
    if hook is None:
        log.info(
            "webhook event %s of %s dropped: the mailbox has no webhook", event.get("id"), mailbox
        )
        return
    wh = cfg.webhooks
    await post_event(
        hook.url,
        hook.secret,
        event,
        now=now,
        timeout=wh.timeout_seconds,
        allow_private=wh.allow_private,
    )
