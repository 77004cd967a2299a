"""What an SQL statement writes: ``INSERT orders`` from the SQL an ORM generates."""

from __future__ import annotations

#: Statements that change the database (the first keyword of the SQL).
WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE", "UPSERT"})
#: The keyword after which each write names its table.
_TABLE_AFTER = {"INSERT": "INTO", "DELETE": "FROM", "REPLACE": "INTO", "MERGE": "INTO"}


def written_table(sql: str) -> str | None:
    """``"INSERT orders"`` for a write statement, ``None`` for anything else."""
    words = sql.replace('"', " ").replace("`", " ").replace("(", " ").split()
    if not words or words[0].upper() not in WRITES:
        return None
    verb = words[0].upper()
    upper = [word.upper() for word in words]
    keyword = _TABLE_AFTER.get(verb)
    position = upper.index(keyword) + 1 if keyword in upper else 1
    table = words[position] if position < len(words) else "?"
    return f"{verb} {table}"
