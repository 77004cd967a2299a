"""The failure database: failing schedules saved per test, replayed first on the next run.

One text file per test under the directory (``.celery-faults/`` by default,
the ini option ``celery_faults_explore_db``), one replay string a line: fit to
commit, or to cache in CI, so a failure found there reproduces on a laptop.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


class FailureDatabase:
    """Replay strings by key (a test's node id), in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        readable = _UNSAFE.sub("_", key)[-80:].strip("_.") or "test"
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        return self.directory / "explore" / f"{readable}-{digest}.txt"

    def load(self, key: str) -> list[str]:
        path = self.path(key)
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    def save(self, key: str, replay: str) -> None:
        saved = self.load(key)
        if replay in saved:
            return
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# celery-faults explore: failing schedules of {key}\n"
        path.write_text(header + "\n".join([*saved, replay]) + "\n", encoding="utf-8")

    def discard(self, key: str, replay: str) -> None:
        """``replay`` passes now: it is fixed, forget it."""
        saved = [line for line in self.load(key) if line != replay]
        path = self.path(key)
        if not saved:
            path.unlink(missing_ok=True)
            return
        header = f"# celery-faults explore: failing schedules of {key}\n"
        path.write_text(header + "\n".join(saved) + "\n", encoding="utf-8")
