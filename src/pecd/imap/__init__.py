"""IMAPS for mailbox holders: pymap over the pecd Maildir store, logins against pecd accounts."""

from pecd.imap.backend import Authenticator
from pecd.imap.service import ImapService

__all__ = ["Authenticator", "ImapService"]
