"""Durable storage: the spool of received files and the SQLite state database."""
