"""What the store's account modules (``accounts``, ``security``, ``tokens``) refuse with."""

from __future__ import annotations

__all__ = ["AccountError"]


class AccountError(ValueError):
    """A refused account operation; the message is one line meant for the operator."""
