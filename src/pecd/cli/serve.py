"""``pecd serve``: run the provider until SIGTERM or SIGINT (SIGHUP reloads the provider index)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from pecd import __version__
from pecd.cli.common import DEFAULT_DIR, EXIT_OK, Subcommands, fail, load, with_config
from pecd.clock import SystemClock

if TYPE_CHECKING:
    from pecd.app import App


class ClamdNotStarted(Exception):
    """The clamd of ``[antivirus] managed = true`` did not start: pecd serve does not either."""


def cmd_serve(args: argparse.Namespace) -> int:
    from pecd.devinit import CONFIG_NAME, init_installation

    if not args.config and not (DEFAULT_DIR / CONFIG_NAME).exists():
        print(f"pecd: no configuration found; initialising {DEFAULT_DIR}/ for development")
        result = asyncio.run(
            init_installation(
                DEFAULT_DIR,
                domain="pec.localhost",
                name="pecd Development PEC",
                clock=SystemClock(),
                antivirus=None,  # on when clamd is installed
            )
        )
        print("Mailboxes (passwords are shown only now):")
        for addr, pw in result.mailboxes.items():
            print(f"  {addr:<40} {pw}")
    cfg = load(args)
    if os.environ.get("PECD_DEBUG"):
        logging.getLogger("pecd").setLevel(logging.DEBUG)
    else:
        # aiosmtpd echoes every SMTP command and address at INFO: five lines per message that
        # say less than the trace log does, cost the event loop a write each, and spread
        # addresses over an ordinary log file. Its warnings and errors still show.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def run() -> None:
        from pecd.app import App

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        app = App(cfg, processes=cfg.processes)  # [serve] processes, or its default

        def stopping() -> None:
            # Before anything else: a supervised process that exits from now on is stopping
            # with us, not to be replaced nor reported as a failure.
            app.shutting_down()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping)
        clamd = None
        if cfg.antivirus.enabled and cfg.antivirus.managed and cfg.antivirus.clamd_config:
            from pecd.antivirus.clamd import ClamdProcess

            # clamd first: scanning fails (and messages wait) until it answers.
            try:
                clamd = ClamdProcess(cfg.antivirus.clamd_config)
                await clamd.start()
            except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
                raise ClamdNotStarted(str(exc)) from None
            clamd.supervise()
            print(f"pecd: clamd (pid {clamd.pid}) answers on {clamd.socket}")
        try:
            await serve(app, stop, loop)
        finally:
            if clamd is not None:
                await clamd.stop()
        print("pecd: stopped")

    async def serve(app: App, stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        async with app:
            index, engines = app.index, app.engines
            if engines is not None:  # each engine process reloads its own
                loop.add_signal_handler(signal.SIGHUP, engines.reload)
            elif index is not None:
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(index.reload()))
            print(
                f"pecd {__version__} serving {cfg.provider.name} ({', '.join(cfg.provider.local_domains)})"
            )
            print("Mail client settings:")
            for line in app.client_settings():
                print(line)
            sys.stdout.flush()
            await stop.wait()
            print("pecd: stopping (draining work in progress)")

    try:
        asyncio.run(run())
    except ClamdNotStarted as exc:
        return fail(f"antivirus.managed: {exc}", 1)
    return EXIT_OK


def register(sub: Subcommands) -> None:
    """Add ``pecd serve`` to the ``pecd`` parser."""
    sv = with_config(
        sub.add_parser("serve", help="run the provider (initialises ./pecd-data if needed)")
    )
    sv.set_defaults(func=cmd_serve)
