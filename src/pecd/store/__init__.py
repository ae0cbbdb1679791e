"""Persistence: the database (SQLite or PostgreSQL), accounts, the job queue and the trace log.

Migrations are Alembic revisions in the top-level ``migrations/`` folder (see ``db.migrate``).
"""
