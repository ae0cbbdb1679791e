"""Mailbox storage: Maildir++ trees that pymap and Dovecot both serve."""

from pecd.mailbox.maildir import Delivered, MailboxFull, MaildirStore

__all__ = ["Delivered", "MailboxFull", "MaildirStore"]
