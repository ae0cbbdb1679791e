"""What every ``pecd`` command shares: exit codes, the config it reads, errors and tables."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pecd.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database

EXIT_OK, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2

DEFAULT_DIR = Path("pecd-data")

Handler = Callable[[argparse.Namespace], int]
"""What a command runs: its parsed arguments in, its exit code out."""


class Subcommands(Protocol):
    """What a command group needs of ``ArgumentParser.add_subparsers()``'s result (whose class,
    ``argparse._SubParsersAction``, is private)."""

    def add_parser(self, name: str, *, help: str | None = ...) -> argparse.ArgumentParser: ...


def fail(message: str, code: int = EXIT_UNREADABLE) -> int:
    """Say ``message`` on standard error, one line; return ``code``."""
    print(f"pecd: {message}", file=sys.stderr)
    return code


def jsonable(value: Any) -> Any:
    """``value`` with its enums and times as JSON can carry them."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` the ``-c/--config`` option."""
    parser.add_argument("-c", "--config", help=f"config file (default {DEFAULT_DIR}/pecd.toml)")
    return parser


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else DEFAULT_DIR / "pecd.toml"


def load(args: argparse.Namespace) -> Config:
    """The config ``-c`` names (or the default one); ConfigError if there is none."""
    path = config_path(args)
    if not path.exists():
        raise ConfigError(f"{path}: no config file here; run `pecd init` or pass -c FILE")
    return load_config(path)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], as_json: bool
) -> None:
    """``rows`` as a table on the terminal, or as a JSON list of objects."""
    if as_json:
        print(
            json.dumps(
                [dict(zip(columns, map(jsonable, r), strict=True)) for r in rows],
                indent=2,
                default=str,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    Console().print(table)


T = TypeVar("T")


async def with_accounts(cfg: Config, fn: Callable[[Accounts, Database], Awaitable[T]]) -> T:
    """``fn`` over the accounts of ``cfg``'s database, opened for it and closed after."""
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database

    db = await Database.open(cfg.database_url)
    try:
        return await fn(Accounts(db), db)
    finally:
        await db.close()
