"""Write a development PKI (see :mod:`pecd.pec.pki`) to a directory, never overwriting."""

from __future__ import annotations

import os
from pathlib import Path

from pecd.pec.pki import DevPki

__all__ = ["write_dev_pki"]

_CERT_MODE = 0o644
_KEY_MODE = 0o600


def write_dev_pki(directory: Path, pki: DevPki) -> dict[str, Path]:
    """Write ca.pem, ca.key, signing.pem, signing.key, tls.pem, tls.key into ``directory``, and
    chain.pem (the intermediate CA, for ``[signing] chain``) when the PKI has one.

    Keys are created mode 0600. If any of the files already exists nothing is written and
    :class:`FileExistsError` is raised. Returns the paths keyed by file name.
    """
    files: dict[str, tuple[bytes, int]] = {
        "ca.pem": (pki.ca.cert_pem, _CERT_MODE),
        "ca.key": (pki.ca.key_pem, _KEY_MODE),
        "signing.pem": (pki.signing.cert_pem, _CERT_MODE),
        "signing.key": (pki.signing.key_pem, _KEY_MODE),
        "tls.pem": (pki.tls.cert_pem, _CERT_MODE),
        "tls.key": (pki.tls.key_pem, _KEY_MODE),
    }
    if pki.chain_pem:
        files["chain.pem"] = (pki.chain_pem, _CERT_MODE)
    paths = {name: directory / name for name in files}
    existing = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing PKI files: {', '.join(existing)}")
    directory.mkdir(parents=True, exist_ok=True)
    for name, (data, mode) in files.items():
        # O_EXCL: a file that appeared meanwhile is still never overwritten.
        fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(paths[name], mode)  # exactly this mode, whatever the umask
    return paths
