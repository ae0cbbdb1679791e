"""pecd: a provider server for Italian certified e-mail (PEC, RFC 6109)."""

__version__ = "0.1.0"
