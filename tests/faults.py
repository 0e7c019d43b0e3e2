"""Faults for tests to inject: stand-ins that fail the way real parts fail."""

from __future__ import annotations

import sqlite3
from typing import Any


class FailingCommit:
    """Stands in for a store's sqlite3 connection and fails every COMMIT."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def close(self) -> None:
        self.db.close()
