"""Test doubles that are real parts: a sqlite3 D1 and a dict-of-bytes R2 (tests/support)."""
