"""Persistent state of the node: ORM tables, sessions, state transitions and the file store.

This package never imports torch or pynetdicom: it works with any SQLAlchemy URL (SQLite by
default, PostgreSQL when several nodes share one state). Import from its modules
(``storage.db``, ``storage.models``, ``storage.transitions``, ``storage.exams``,
``storage.deliveries``, ``storage.reports``, ``storage.leases``, ``storage.files``,
``storage.query``).
"""
