"""(being written: see pecd.web.pages)"""

from __future__ import annotations

from starlette.routing import BaseRoute

from pecd.config import Config


def routes(cfg: Config) -> list[BaseRoute]:
    return []
