"""POP3 for mailbox holders (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS) over the Maildir store."""

from pecd.pop3.service import Pop3Service

__all__ = ["Pop3Service"]
