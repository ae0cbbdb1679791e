"""``pecd queue``: list and show jobs; retry, requeue, park or delete one job or every job a
filter selects (kind, state, destination, error, age), so that an operator can act on a stuck
destination. The logic is in :mod:`pecd.store.queue_admin`; each command is one transaction."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pecd.cli.common import (
    EXIT_INVALID,
    EXIT_OK,
    Subcommands,
    fail,
    load,
    print_table,
    with_accounts,
    with_config,
)
from pecd.clock import SystemClock

if TYPE_CHECKING:
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database
    from pecd.store.queue_admin import JobFilter, JobSummary

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d``, ``1w``, ``1h30m``: a duration."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        return timedelta(seconds=float(t))
    if not t or _DURATION.sub("", t):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 90s, 15m, 2h, 3d)")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(t)))


def _filter(args: argparse.Namespace, *, limit: int | None) -> JobFilter:
    from pecd.store.queue_admin import JobFilter

    return JobFilter(
        kinds=tuple(args.kind or ()),
        states=tuple(args.state or ()),
        destination=args.destination,
        error=args.error,
        older_than=args.older_than,
        limit=limit,
    )


def _short(text: str | None, width: int = 60) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _rows(jobs: list[JobSummary]) -> list[tuple[object, ...]]:
    return [
        (
            j.id,
            j.kind,
            j.shown_state,
            j.attempts,
            j.next_run_at,
            ", ".join(j.destinations),
            ", ".join(j.recipients),
            j.size,
            _short(j.last_error),
        )
        for j in jobs
    ]


_COLUMNS = [
    "id",
    "kind",
    "state",
    "attempts",
    "next_run_at",
    "destination",
    "recipients",
    "size",
    "last_error",
]


def _routes(cfg: Any) -> dict[str, tuple[str, int]]:
    return {d.lower(): (e.host, e.port) for d, e in cfg.routes.items()}


def cmd_list(args: argparse.Namespace) -> int:
    from pecd.store import queue_admin as qa

    cfg = load(args)

    async def go(_acc: Accounts, db: Database) -> int:
        async with db.read_session() as s, s.begin():
            found = await qa.find(
                s, _filter(args, limit=args.limit), now=SystemClock().now(), routes=_routes(cfg)
            )
        if args.json:
            print(json.dumps([j.to_json() for j in found], indent=2))
        else:
            print_table("Queue", _COLUMNS, _rows(found), False)
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def cmd_show(args: argparse.Namespace) -> int:
    from pecd.store import queue_admin as qa

    cfg = load(args)

    async def go(_acc: Accounts, db: Database) -> int:
        async with db.read_session() as s, s.begin():
            j = await qa.get(s, args.job_id, now=SystemClock().now())
        if j is None:
            return fail(f"job {args.job_id} does not exist", EXIT_INVALID)
        out = j.to_json()
        if args.json:
            print(json.dumps(out, indent=2))
            return EXIT_OK
        out["recipients"] = ", ".join(j.recipients)
        out["destinations"] = ", ".join(j.destinations)
        out["if deleted, loses"] = qa.LOSSES.get(j.kind, "")
        width = max(map(len, out))
        for k, v in out.items():
            print(f"{k:<{width}}  {'' if v is None else v}")
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def cmd_action(args: argparse.Namespace) -> int:
    """retry, requeue, park, delete: of one job (its id), or of what the filters select."""
    from pecd.store import queue_admin as qa

    action = qa.Action(args.queue_command)
    force = bool(getattr(args, "force", False))
    flt = _filter(args, limit=args.limit)
    if args.job_id is not None and not flt.is_empty():
        return fail("give a job id or filters, not both", EXIT_INVALID)
    if args.job_id is None and flt.is_empty() and not args.all:
        return fail(
            f"`pecd queue {action}` needs a job id, a filter (--kind, --state, --destination, "
            "--error, --older-than) or --all",
            EXIT_INVALID,
        )
    cfg = load(args)

    async def go(_acc: Accounts, db: Database) -> int:
        now = SystemClock().now()
        async with db.session() as s, s.begin():  # one transaction: look, then change
            if args.job_id is not None:
                one = await qa.get(s, args.job_id, now=now)
                if one is None:
                    return fail(f"job {args.job_id} does not exist", EXIT_INVALID)
                if not qa.eligible(one, action, force=force):
                    states = " or ".join(qa.applies_to(action, force=force))
                    return fail(
                        f"job {one.id} is {one.shown_state}: `{action}` applies to {states} jobs",
                        EXIT_INVALID,
                    )
                matched = [one]
            else:
                matched = await qa.find(s, flt, now=now, routes=_routes(cfg))
            targets = [j for j in matched if qa.eligible(j, action, force=force)]
            if action is qa.Action.DELETE:
                refused = qa.refused_deletions(targets, force=force)
                if refused:
                    for j in refused:
                        print(f"pecd: would lose {j.loss()}", file=sys.stderr)
                    never = sum(j.kind in qa.NEVER_DELETED for j in refused)
                    why = (
                        f"{never} of them are submissions or receptions whose receipt is still "
                        "owed: pecd never deletes those (park them); deleting the rest"
                        if never
                        else "deleting them"
                    )
                    return fail(
                        f"refused, nothing deleted: {len(refused)} job(s) carry a message that "
                        f"was accepted or a receipt that is owed; {why} breaks the PEC "
                        "guarantees: retry or requeue them, or pass --force",
                        EXIT_INVALID,
                    )
                if force:
                    for j in targets:
                        print(f"pecd: {'would lose' if args.dry_run else 'losing'} {j.loss()}")
            if args.dry_run:
                changed = [j.id for j in targets]
            else:
                changed = await qa.change(s, action, targets, now=now, force=force)
        _report(args, action, matched, changed)
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


_DONE = {"retry": "made ready", "requeue": "requeued", "park": "parked", "delete": "deleted"}


def _report(
    args: argparse.Namespace, action: str, matched: list[JobSummary], changed: list[int]
) -> None:
    done = set(changed)
    untouched = [j for j in matched if j.id not in done]
    if args.json:
        print(
            json.dumps(
                {
                    "action": action,
                    "dry_run": args.dry_run,
                    "matched": [j.id for j in matched],
                    "changed": changed,
                    "untouched": [{"id": j.id, "state": j.shown_state} for j in untouched],
                },
                indent=2,
            )
        )
        return
    verb = _DONE[action]
    if args.dry_run:
        print(f"pecd: dry run: {len(matched)} job(s) matched; {len(changed)} would be {verb}")
        if matched:
            print_table("Matched", _COLUMNS, _rows(matched), False)
    else:
        print(f"pecd: {len(matched)} job(s) matched; {len(changed)} {verb}")
    if untouched:
        by_state: dict[str, int] = {}
        for j in untouched:
            by_state[j.shown_state] = by_state.get(j.shown_state, 0) + 1
        counts = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
        print(f"pecd: {len(untouched)} left as they are ({counts}): `{action}` does not apply")


def _filters(p: argparse.ArgumentParser, *, limit: int | None) -> None:
    from pecd.store.queue_admin import STATES

    p.add_argument(
        "--kind",
        action="append",
        help="job kind (submission, reception, delivery, store, relay, webhook); repeatable",
    )
    p.add_argument(
        "--state",
        action="append",
        choices=STATES,
        help="leased: running under a live lease; expired: running, its lease expired "
        "(default: all but done); repeatable",
    )
    p.add_argument(
        "--destination",
        metavar="DOMAIN_OR_HOST",
        help="a recipient domain, or the host (host:port) of a static route",
    )
    p.add_argument("--error", metavar="SUBSTRING", help="last error contains this (any case)")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="created more than this long ago (90s, 15m, 2h, 3d, 1w)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=limit,
        help="at most N jobs" + (f" (default {limit})" if limit else " (default: no limit)"),
    )
    p.add_argument("--json", action="store_true")


def register(sub: Subcommands) -> None:
    """Add ``pecd queue …`` to the ``pecd`` parser."""
    q = sub.add_parser("queue", help="jobs waiting, running or parked; retry, park, delete")
    q_sub = q.add_subparsers(dest="queue_command", required=True)
    ql = with_config(q_sub.add_parser("list", help="jobs the filters select"))
    _filters(ql, limit=100)
    ql.set_defaults(func=cmd_list)
    qs = with_config(q_sub.add_parser("show", help="one job: its state and its payload's gist"))
    qs.add_argument("job_id", type=int)
    qs.add_argument("--json", action="store_true")
    qs.set_defaults(func=cmd_show)
    helps = {
        "retry": "make jobs ready now (their attempts count on)",
        "requeue": "make jobs ready now with a fresh attempt count (e.g. parked ones)",
        "park": "park jobs: no worker takes them until they are retried or requeued",
        "delete": "delete parked jobs (--force: ready ones too, and relays, deliveries, stores; "
        "never submissions or receptions)",
    }
    for name, text in helps.items():
        p = with_config(q_sub.add_parser(name, help=text))
        p.add_argument("job_id", type=int, nargs="?", help="one job (or use filters)")
        _filters(p, limit=None)
        p.add_argument("--all", action="store_true", help="every job (no filter)")
        p.add_argument("--dry-run", action="store_true", help="show what would change")
        if name == "delete":
            p.add_argument(
                "--force",
                action="store_true",
                help="also ready (and lease-expired) jobs, and jobs whose deletion loses an "
                "accepted message or an owed receipt",
            )
        p.set_defaults(func=cmd_action)
