"""The ``pecd`` command line: the parser and :func:`main`; each command group lives in a module of
its own (``pecd.cli.verify``, ``init``, ``dovecot``, ``serve``, ``accounts``, ``queue``, ``index``,
``log``, ``receipt``, ``virus``), what they share in :mod:`pecd.cli.common`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pecd import __version__
from pecd.cli import accounts, dovecot, index, init, log, queue, receipt, serve, verify, virus
from pecd.cli.common import Handler, fail
from pecd.config import ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``pecd`` parser: every command sets ``func``, the :data:`Handler` that runs it."""
    p = argparse.ArgumentParser(
        prog="pecd", description="PEC (posta elettronica certificata) provider"
    )
    p.add_argument("--version", action="version", version=f"pecd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # In the order `pecd --help` lists them.
    verify.register(sub)
    init.register_pki(sub)
    init.register(sub)
    dovecot.register(sub)
    serve.register(sub)
    accounts.register(sub)
    queue.register(sub)
    index.register(sub)
    log.register(sub)
    receipt.register(sub)
    virus.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except ConfigError as exc:
        return fail(str(exc), 1)
    except ValueError as exc:  # AccountError and bad arguments: one line, no traceback
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
