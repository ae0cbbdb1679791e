"""The server TLS context every listener uses (SMTP, IMAP, POP3), from the ``[tls]`` section."""

from __future__ import annotations

import ssl

from pecd.config import Config

__all__ = ["server_tls_context"]


def server_tls_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
    return ctx
