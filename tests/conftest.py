"""Shared fixtures: a development PKI, a signer over it, the real-message corpus, a database for
end-to-end tests. Their constants and helpers live in the support module, helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import CORPUS_DIR, PKI_DOMAIN, PKI_NAME, PKI_NOW, read_manifest
from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.smime import KeySigner


@pytest.fixture(scope="session")
def dev_pki() -> DevPki:
    return create_dev_pki(domain=PKI_DOMAIN, name=PKI_NAME, now=PKI_NOW)


@pytest.fixture(scope="session")
def signer(dev_pki: DevPki) -> KeySigner:
    return KeySigner.from_pem(dev_pki.signing.key_pem, dev_pki.signing.cert_pem)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    # The corpus is part of the test data: a missing corpus is a failure, never a skip.
    assert (CORPUS_DIR / "MANIFEST.tsv").is_file(), f"corpus not found at {CORPUS_DIR}"
    return CORPUS_DIR


@pytest.fixture(scope="session")
def manifest(corpus_dir: Path) -> list[dict[str, str]]:
    return read_manifest(corpus_dir)


@pytest.fixture(
    params=[
        pytest.param(None, id="sqlite"),
        pytest.param(
            "postgresql",
            id="postgresql",
            marks=pytest.mark.skipif(
                not os.environ.get("PECD_TEST_POSTGRES_URL"),
                reason="PECD_TEST_POSTGRES_URL not set",
            ),
        ),
    ]
)
def db_url_for_e2e(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None for the embedded default (SQLite under the installation's data dir), or the URL of
    a fresh PostgreSQL database of this test alone, dropped afterwards."""
    if request.param is None:
        yield None
        return
    from store_fixtures import fresh_postgres_database

    url, drop = fresh_postgres_database()
    try:
        yield url
    finally:
        drop()
