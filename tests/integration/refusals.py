"""A database rule of a test's own that refuses result rows: stands for any constraint or
value the database turns down, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text


def refuse_results(conn: Any, where: str = "true") -> None:
    """From now on the database refuses (SQLSTATE 23514 / SQLite ABORT) every inserted
    ``results`` row for which the SQL condition ``where`` on ``NEW`` holds."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(
            "CREATE FUNCTION t_refuse() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'; END $$ "
            "LANGUAGE plpgsql"))
        conn.execute(text(f"CREATE TRIGGER t_refuse BEFORE INSERT ON results FOR EACH ROW "
                          f"WHEN ({where}) EXECUTE FUNCTION t_refuse()"))
    else:
        conn.execute(text(f"CREATE TRIGGER t_refuse BEFORE INSERT ON results WHEN {where} "
                          "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
