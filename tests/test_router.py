"""Where the relay sends mail: static routes first, then DNS MX by preference (no DNS traffic:
the resolver is replaced by a table)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import dns.resolver
import pytest

from pecd.runtime import relay
from pecd.runtime.relay import Destination, PermanentFailure, Router, TemporaryFailure


@dataclass
class MX:
    preference: int
    exchange: str


def router_with(answers: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Router:
    async def resolve(name: str, rdtype: str) -> Any:
        value = answers[name]
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(relay.dns.asyncresolver, "resolve", resolve)
    return Router({}, 25)


def test_mx_by_preference_then_implicit_mx(monkeypatch: pytest.MonkeyPatch) -> None:
    r = router_with(
        {
            "pec.b.it": [MX(20, "mx2.b.it."), MX(10, "mx1.b.it.")],
            "plain.it": dns.resolver.NoAnswer(),
        },
        monkeypatch,
    )
    assert asyncio.run(r.resolve("PEC.B.IT")) == [
        Destination("mx1.b.it", 25),
        Destination("mx2.b.it", 25),
    ]
    assert asyncio.run(r.resolve("plain.it")) == [Destination("plain.it", 25)]


def test_static_route_wins_and_failures_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    r = router_with(
        {
            "gone.it": dns.resolver.NXDOMAIN(),
            "flaky.it": dns.resolver.LifetimeTimeout(),
            "null.it": [MX(0, ".")],
        },
        monkeypatch,
    )
    r.routes["pec.c.it"] = Destination("127.0.0.1", 2525)
    assert asyncio.run(r.resolve("pec.c.it")) == [Destination("127.0.0.1", 2525)]
    with pytest.raises(PermanentFailure) as gone:
        asyncio.run(r.resolve("gone.it"))
    assert gone.value.errore.value == "no-dominio"
    with pytest.raises(TemporaryFailure):
        asyncio.run(r.resolve("flaky.it"))
    with pytest.raises(PermanentFailure):
        asyncio.run(r.resolve("null.it"))
