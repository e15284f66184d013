"""The lm-eval adapter's response cache: model responses keyed by the sha256 of a request, JSON values in one
SQLite table (no pickle), and the adapter version that keys them. Below both the adapter and the stage around it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

# Bumped when the adapter's scoring changes, so cached lm-eval stages and responses are redone.
ADAPTER_VERSION = 1


class ResponseCache:
    """Model responses keyed by the sha256 of a request, JSON values in one SQLite table (no pickle)."""

    def __init__(self, path: Path | None) -> None:
        self.db = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path))
            self.db.execute("CREATE TABLE IF NOT EXISTS r (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        self.hits = self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Any:
        row = None if self.db is None else self.db.execute("SELECT v FROM r WHERE k = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        if self.db is not None:
            self.db.execute("INSERT OR REPLACE INTO r VALUES (?, ?)", (key, json.dumps(value)))

    def commit(self) -> None:
        if self.db is not None:
            self.db.commit()

    def close(self) -> None:
        if self.db is not None:
            self.db.commit()
            self.db.close()
            self.db = None
