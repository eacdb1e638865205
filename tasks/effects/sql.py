"""SQL statements parsed with sqlglot, and which of them destroy data: DROP of a table, schema,
database or view, TRUNCATE, DELETE or UPDATE without a restricting WHERE (none, or one that is
always true such as `WHERE 1=1`), also inside a CTE. Parameterised statements
(`DELETE FROM users WHERE id = ?`) restrict and are not destructive."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import sqlglot
import sqlglot.expressions as exp

from tasks.effects.shell import Command

# sqlglot warns on every statement it parses as a generic Command (ALTER USER …): the
# classification handles those, so the warning is noise in every run's stderr.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

SQL_HINT = re.compile(r"^\s*(WITH|SELECT|INSERT|UPDATE|DELETE|DROP|TRUNCATE|ALTER|CREATE|REPLACE|MERGE|GRANT|REVOKE)\b",
                      re.I | re.M)
_DROPPED_KINDS = frozenset({"TABLE", "DATABASE", "SCHEMA", "VIEW", ""})
# What sqlglot could not parse into a tree is still read for the unmistakable cases.
_RAW_DESTROYS = re.compile(r"(?is)^\s*(DROP\s+(TABLE|DATABASE|SCHEMA)|TRUNCATE)\b")


@dataclass(frozen=True)
class SqlStatement:
    """One SQL statement: what kind it is, its text as sqlglot writes it, why it destroys data
    (None when it does not) and the tables it names."""

    kind: str                 # select | insert | update | delete | drop | truncate | alter | other
    text: str
    destroys: str | None      # why it destroys data, or None
    tables: tuple[str, ...] = ()


def _literal(node: Any) -> bool:
    return isinstance(node, (exp.Literal, exp.Boolean))


def _trivially_true(where: Any) -> bool:
    """Whether a WHERE condition holds for every row (`1=1`, `TRUE`, `'a'='a'`, `1<>0`, `x OR 1=1`)."""
    cond = where.this if isinstance(where, exp.Where) else where
    if isinstance(cond, exp.Boolean):
        return bool(cond.this)
    if isinstance(cond, exp.Literal):
        return cond.this not in ("0", "")
    if isinstance(cond, (exp.EQ, exp.GTE, exp.LTE)) and cond.left == cond.right:
        return True
    if isinstance(cond, (exp.NEQ, exp.GT, exp.LT)) and _literal(cond.left) and _literal(cond.right) \
            and cond.left != cond.right and not cond.left.is_string and not cond.right.is_string:
        left, right = float(cond.left.this), float(cond.right.this)
        return left != right if isinstance(cond, exp.NEQ) else (left > right if isinstance(cond, exp.GT) else left < right)
    if isinstance(cond, exp.Not) and isinstance(cond.this, exp.Boolean):
        return not cond.this.this
    if isinstance(cond, exp.Or):
        return _trivially_true(cond.left) or _trivially_true(cond.right)
    if isinstance(cond, exp.And):
        return _trivially_true(cond.left) and _trivially_true(cond.right)
    if isinstance(cond, exp.Paren):
        return _trivially_true(cond.this)
    return False


def _unrestricted(node: Any) -> str | None:
    where = node.args.get("where")
    if where is None:
        return "without WHERE"
    try:
        return "with an always-true WHERE" if _trivially_true(where) else None
    except (TypeError, ValueError):
        return None


def _statement(tree: Any) -> SqlStatement:
    stmt_text = tree.sql()[:300]
    tables = tuple(sorted({t.name for t in tree.find_all(exp.Table) if t.name}))
    destroys: str | None = None
    kind = "other"
    for node in tree.walk():
        if isinstance(node, exp.Drop):
            what = str(node.args.get("kind") or "").upper()
            if what in _DROPPED_KINDS:
                destroys, kind = f"DROP {what or 'object'}", "drop"
        elif isinstance(node, exp.TruncateTable):
            destroys, kind = "TRUNCATE", "truncate"
        elif isinstance(node, exp.Delete):
            kind = "delete" if kind == "other" else kind
            why = _unrestricted(node)
            destroys = destroys or (f"DELETE {why}" if why else None)
        elif isinstance(node, exp.Update):
            kind = "update" if kind == "other" else kind
            why = _unrestricted(node)
            destroys = destroys or (f"UPDATE {why}" if why else None)
        elif isinstance(node, exp.Alter) and any(isinstance(a, exp.Drop) for a in node.args.get("actions") or []):
            destroys, kind = "ALTER … DROP", "alter"
    if isinstance(tree, (exp.Select, exp.Union)):
        kind = "select"   # a CTE that writes still returns rows; `destroys` says what it does
    elif isinstance(tree, exp.Insert):
        kind = "insert"
    elif isinstance(tree, exp.Command) and _RAW_DESTROYS.match(tree.sql()):
        words = tree.sql().split()
        kind = words[0].lower()
        destroys = " ".join(words[:2]).upper() if kind == "drop" else "TRUNCATE"
    return SqlStatement(kind, stmt_text, destroys, tables)


@lru_cache(maxsize=4096)
def sql_statements(text: str) -> tuple[SqlStatement, ...]:
    """Statements of a SQL text with what each does; a text sqlglot cannot parse is 'other'
    (or destructive when it plainly starts with DROP TABLE/SCHEMA/DATABASE or TRUNCATE)."""
    if not text or not SQL_HINT.search(text):
        return ()
    try:
        trees = [t for t in sqlglot.parse(text, error_level=sqlglot.ErrorLevel.IGNORE) if t is not None]
    except Exception:
        trees = []
    if not trees:
        return tuple(SqlStatement(s.split()[0].lower(), s[:300], f"{s.split()[0].upper()} (unparsed)")
                     for s in re.split(r";\s*", text) if _RAW_DESTROYS.match(s))
    return tuple(_statement(t) for t in trees)


_SQL_CLIENT_FLAGS = {"psql": ("-c", "--command"), "mysql": ("-e", "--execute"), "mariadb": ("-e", "--execute"),
                     "sqlite3": ("-cmd",), "duckdb": ("-c",), "clickhouse-client": ("-q", "--query"),
                     "sqlcmd": ("-Q", "-q"), "cockroach": ("-e", "--execute"), "snowsql": ("-q", "--query"),
                     "bq": (), "mycli": ("-e", "--execute"), "pgcli": ()}
SQL_CLIENTS = frozenset(_SQL_CLIENT_FLAGS)


def sql_in_command(cmd: Command) -> list[str]:
    """SQL texts a shell command sends to a database client: `psql -c '…'`, `mysql -e "…"`,
    `sqlite3 app.db "…"`, a here-document or `echo "…" | psql`."""
    flags = _SQL_CLIENT_FLAGS.get(cmd.prog)
    if flags is None:
        return []
    out: list[str] = []
    for j, a in enumerate(cmd.argv[1:], start=1):
        if a in flags and j + 1 < len(cmd.argv):
            out.append(cmd.argv[j + 1])
        elif a.startswith("--") and a.split("=", 1)[0] in flags:
            out.append(a.split("=", 1)[1])
    if cmd.prog in ("sqlite3", "duckdb") and len(cmd.operands()) >= 2:
        out.append(cmd.operands()[-1])
    if cmd.prog == "bq" and cmd.operands()[:1] == ["query"]:
        out.extend(cmd.operands()[1:])
    if cmd.stdin:
        out.append(cmd.stdin)
    return [s for s in out if SQL_HINT.search(s)]
