"""The webmail's pages, server-rendered (Jinja2 templates in ``pecd/web/templates``, the one
stylesheet and the one small script in ``pecd/web/static``).

Each module gives ``routes(cfg) -> list[BaseRoute]``; :func:`page_routes` joins them:

* ``auth``: login (password, then the second factor when the mailbox has one), logout, the
  language switch, the static files;
* ``settings``: password change, TOTP enrolment, app passwords, API tokens, quota;
* ``mail``: folders, message lists and search, reading a PEC message (the original unwrapped, the
  daticert, the signature verdict, the sanitised HTML in a sandboxed frame), attachments, the
  timeline of a sent message and its evidence bundle;
* ``compose``: writing a PEC (through the durable intake, as SMTP) and the verify page.

What they share is in ``pecd.web.ui`` (templates, translation, sessions, CSRF).
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from pecd.config import Config
from pecd.web.pages import auth, compose, mail, settings

__all__ = ["page_routes"]


def page_routes(cfg: Config) -> list[BaseRoute]:
    return [
        *auth.routes(cfg),
        *settings.routes(cfg),
        *mail.routes(cfg),
        *compose.routes(cfg),
    ]
