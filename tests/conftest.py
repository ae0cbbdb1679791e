"""Shared fixtures: a development PKI, a signer over it, and the real-message corpus."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.smime import KeySigner

PKI_DOMAIN = "pec.example.test"
PKI_NAME = "Example PEC S.p.A."
PKI_NOW = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
# Real messages from real providers, kept in the repository (MANIFEST.tsv names each public
# source), so that a fresh clone needs nothing beside it.
CORPUS_DIR = Path(__file__).resolve().parent / "data" / "pec-real"


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


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    """MANIFEST.tsv as one dict per row, keyed by the header line's column names."""
    lines = (corpus / "MANIFEST.tsv").read_text("utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line]


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
