"""On-disk answer cache: SQLite in WAL mode, one row per (request key, server), successful answers only.

The request key hashes the model name, the messages and every sampling parameter; `server` names who
answered (for an OpenAI-compatible backend its base URLs, for in-process vLLM the model path), so two
servers that serve the same model name never share answers. A file written before the server was
recorded is migrated on open; its answers get an empty server and are not reused by a backend that names one.

Each `put` is its own transaction, committed before the answer reaches the caller, so a process killed at
any moment loses only answers nobody has seen yet. WAL with `synchronous=NORMAL` makes such a commit an
append to the -wal file without fsync: it survives a killed process (the OS holds the bytes), and only an
OS crash or power loss can drop the last commits. Several processes (e.g. shard jobs) may write the same
file; writers wait for each other through `busy_timeout`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import MprError
from pipeline.llm.types import ChatResult

_STORED = {"content", "finish_reason", "logprobs", "prompt_tokens", "completion_tokens"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT NOT NULL,
    server TEXT NOT NULL,
    model TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (key, server)
) WITHOUT ROWID
"""
_MIGRATE = (
    "\nINSERT OR IGNORE INTO answers (key, server, model, value, created) "
    "SELECT key, '', model, value, created FROM answers_v1\n"
)


class ResultCache:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._set_wal()
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise MprError(f"{self.path}: cannot open the LLM answer cache ({e})") from e

    def _set_wal(self) -> None:
        # Switching a fresh file to WAL needs an exclusive lock; N shard jobs starting together may collide.
        for attempt in range(50):
            try:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() == "wal":
                    return
            except sqlite3.OperationalError:
                pass
            time.sleep(0.05 * (attempt + 1))
        raise MprError(f"{self.path}: cannot switch the LLM answer cache to WAL mode (file locked?)")

    def _columns(self) -> list[str]:
        return [row[1] for row in self._db.execute("PRAGMA table_info(answers)")]

    def _migrate(self) -> None:
        """Rebuild a table written before answers were keyed by server (one transaction, once)."""
        columns = self._columns()
        if not columns or "server" in columns:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if "server" not in self._columns():  # another process may have migrated it meanwhile
                self._db.execute("ALTER TABLE answers RENAME TO answers_v1")
                self._db.execute(_SCHEMA)
                self._db.execute(_MIGRATE)
                self._db.execute("DROP TABLE answers_v1")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def get(self, key: str, server: str | None = None) -> ChatResult | None:
        """The answer to `key` from `server` (None: from any server)."""
        if server is None:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        else:
            row = self._db.execute(
                "SELECT value FROM answers WHERE key = ? AND server = ?", (key, server)
            ).fetchone()
        return _load(key, row[0]) if row else None

    def get_many(self, keys: Iterable[str], server: str | None = None) -> dict[str, ChatResult]:
        found: dict[str, ChatResult] = {}
        keys = list(keys)
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            where, args = (
                (f"key IN ({marks})", chunk)
                if server is None
                else (f"key IN ({marks}) AND server = ?", [*chunk, server])
            )
            for key, value in self._db.execute(f"SELECT key, value FROM answers WHERE {where}", args):
                found[key] = _load(key, value)
        return found

    def put(self, result: ChatResult, model: str = "", server: str = "") -> None:
        """Store one successful answer and commit it."""
        if not result.ok:
            raise ValueError("only successful answers are cached")
        value = result.model_dump_json(include=_STORED, exclude_none=True)
        self._db.execute(
            "INSERT OR REPLACE INTO answers (key, server, model, value, created) VALUES (?, ?, ?, ?, ?)",
            (result.key, server, model, value, time.time()),
        )

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM answers WHERE key = ?", (key,))

    def keys(self) -> list[str]:
        return [k for (k,) in self._db.execute("SELECT DISTINCT key FROM answers")]

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def __contains__(self, key: object) -> bool:
        return self._db.execute("SELECT 1 FROM answers WHERE key = ?", (key,)).fetchone() is not None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultCache({str(self.path)!r})"


def _load(key: str, value: str) -> ChatResult:
    data = json.loads(value)
    return ChatResult(key=key, cached=True, **data)
