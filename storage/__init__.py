"""Persistent state of the node: ORM tables, sessions, state transitions and the file store.

This package never imports torch or pynetdicom: it works with any SQLAlchemy URL (SQLite by
default, PostgreSQL when several nodes share one state).
"""

from storage.db import Database
from storage.files import FileStore, InvalidUID, is_valid_uid
from storage.models import EXAM_STATES, OUTBOUND_STATES, SLOTS, Exam, Instance, Outbound, Result

__all__ = ["Database", "FileStore", "InvalidUID", "is_valid_uid", "Exam", "Instance",
           "Result", "Outbound", "EXAM_STATES", "OUTBOUND_STATES", "SLOTS"]
