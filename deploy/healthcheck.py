#!/usr/bin/env python3
"""The container HEALTHCHECK of pecd: GET /healthz on the config's [metrics] listen.

Exit 0 when /healthz answers 200, 1 otherwise. With [metrics] off (listen = "") there is no port
to ask: the check passes once the config file is readable, and says so. Reads the config with
tomllib only (no pecd import: a check runs every few seconds), and puts the environment's
values in it as pecd's loader does ("${NAME:-default}"). The config file is $PECD_CONFIG,
default /etc/pecd/pecd.toml.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
import urllib.request


def expand(value: str) -> str:
    """``${NAME}`` / ``${NAME:-default}`` as pecd.config expands them (``$${`` stays literal)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return m.group(0)[1:]
        found = os.environ.get(m.group(2))
        return m.group(3) if m.group(3) is not None and not found else found or ""

    return re.sub(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", sub, value)


def main() -> int:
    path = os.environ.get("PECD_CONFIG", "/etc/pecd/pecd.toml")
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"pecd-healthcheck: {path}: {exc}")
        return 1
    listen = expand(str(cfg.get("metrics", {}).get("listen", "") or ""))
    if not listen:
        print("pecd-healthcheck: [metrics] listen is off; nothing to ask")
        return 0
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::", "*"):
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"pecd-healthcheck: {url}: {exc}")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
