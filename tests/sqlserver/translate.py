"""T-SQL to SQLite, through sqlglot, plus the few statements SQLite has no words for.

A batch becomes a list of steps. Most are SQLite statements that sqlglot wrote from
the T-SQL; the rest are control steps the session runs itself: transactions,
WAITFOR DELAY, SET options. What SQLite cannot answer (@@SPID, SERVERPROPERTY, the
catalog views SQLAlchemy reads) is rewritten to functions and temporary views that
each SQLite connection gets when it opens (see session.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from .catalog import INSPECTOR_CATALOG
from .storage import table_locking

# Catalog views -> the temporary view standing in for each (created per connection).
CATALOG_VIEWS = {
    ("information_schema", "tables"): "tds_is_tables",
    ("information_schema", "columns"): "tds_is_columns",
    ("sys", "tables"): "tds_sys_tables",
    ("sys", "objects"): "tds_sys_objects",
    ("sys", "schemas"): "tds_sys_schemas",
    ("sys", "system_views"): "tds_sys_system_views",
    ("sys", "dm_exec_sessions"): "tds_sys_dm_exec_sessions",
    ("sys", "dm_tran_session_transactions"): "tds_sys_dm_tran_session_transactions",
    ("sys", "dm_tran_database_transactions"): "tds_sys_dm_tran_database_transactions",
    ("sys", "indexes"): "tds_sys_indexes",
    **INSPECTOR_CATALOG,
}
# @@variables -> functions each connection registers.
GLOBAL_VARIABLES = {"spid": "tds_spid", "trancount": "tds_trancount",
                    "version": "tds_version", "servername": "tds_servername"}


class TranslationError(Exception):
    """SQL Server's error for a statement this server cannot run: 102 and friends."""

    def __init__(self, number: int, message: str, severity: int = 15, state: int = 1):
        super().__init__(message)
        self.number, self.message, self.severity, self.state = number, message, severity, state


@dataclass(frozen=True)
class Step:
    kind: str                 # sql, begin, commit, rollback, waitfor, implicit, noop, typeinfo,
                              # kill, save, rollback_to
    sql: str = ""             # sql: the SQLite text
    text: str = ""            # the T-SQL it came from; save, rollback_to: the savepoint
    seconds: float = 0.0      # waitfor
    data_type: int = 0        # typeinfo: the ODBC data type asked for; kill: the spid
    flag: bool = False        # implicit: on/off; commit/rollback: only if a tran is open
    params: list = field(default_factory=list)   # sql: :name placeholders it uses
    returns_rows: bool = False
    tables: tuple = ()        # sql: (table, alias, hints) for the lock manager (storage.py)


_WAITFOR = re.compile(r"^\s*WAITFOR\s+DELAY\s+'(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,3}))?'\s*;?\s*$",
                      re.I)
_BEGIN = re.compile(r"^\s*BEGIN\s+TRAN(SACTION)?(\s+\w+)?\s*;?\s*$", re.I)
_COMMIT = re.compile(r"^\s*(IF\s+@@TRANCOUNT\s*>\s*0\s+)?COMMIT(\s+(TRAN|TRANSACTION|WORK))?(\s+\w+)?\s*;?\s*$", re.I)
_ROLLBACK = re.compile(r"^\s*(IF\s+@@TRANCOUNT\s*>\s*0\s+)?ROLLBACK(\s+(TRAN|TRANSACTION|WORK))?(\s+\w+)?\s*;?\s*$", re.I)
_KILL = re.compile(r"^\s*KILL\s+(\d+)\s*;?\s*$", re.I)
_SAVE = re.compile(r"^\s*SAVE\s+TRAN(?:SACTION)?\s+(\w+)\s*;?\s*$", re.I)
_IMPLICIT = re.compile(r"^\s*SET\s+IMPLICIT_TRANSACTIONS\s+(ON|OFF)\s*;?\s*$", re.I)
_SET = re.compile(r"^\s*SET\s+\w+", re.I)
_PROCEDURE_CALL = re.compile(r"^\s*(?:EXEC(?:UTE)?\s+)?((?:\[?\w+\]?\.)*\[?sp_\w+\]?)(?:\s|$)", re.I)
_TYPE_INFO_CALL = re.compile(r"^\s*(?:EXEC(?:UTE)?\s+)?(?:\[?sys\]?\.)?\[?sp_datatype_info(?:_100)?\]?"
                             r"\s+(-?\d+)", re.I)
_ISO_DAY = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def _split(batch: str) -> list[str]:
    """Control statements are recognised whole; anything else goes to sqlglot, which
    splits on semicolons itself."""
    stripped = batch.strip()
    if not stripped:
        return []
    parts = [part for part in re.split(r";\s*(?=(?:[^']*'[^']*')*[^']*$)", stripped) if part.strip()]
    if all(_control_step(part) for part in parts):
        return parts
    # Mixed batch: keep control statements apart, group the rest for sqlglot.
    grouped: list[str] = []
    pending: list[str] = []
    for part in parts:
        if _control_step(part):
            if pending:
                grouped.append("; ".join(pending))
                pending = []
            grouped.append(part)
        else:
            pending.append(part)
    if pending:
        grouped.append("; ".join(pending))
    return grouped


def _control_step(text: str) -> Step | None:
    found = _WAITFOR.match(text)
    if found:
        hours, minutes, seconds, millis = found.groups()
        return Step("waitfor", text=text, seconds=int(hours) * 3600 + int(minutes) * 60
                    + int(seconds) + int((millis or "0").ljust(3, "0")) / 1000)
    if _BEGIN.match(text):
        return Step("begin", text=text)
    found = _COMMIT.match(text)
    if found:
        return Step("commit", text=text, flag=bool(found.group(1)))
    found = _ROLLBACK.match(text)
    if found and found.group(3) and found.group(4):   # ROLLBACK TRANSACTION savepoint
        return Step("rollback_to", text=found.group(4).strip())
    if found:
        return Step("rollback", text=text, flag=bool(found.group(1)))
    found = _SAVE.match(text)
    if found:
        return Step("save", text=found.group(1))
    found = _KILL.match(text)
    if found:
        return Step("kill", text=text, data_type=int(found.group(1)))
    found = _IMPLICIT.match(text)
    if found:
        return Step("implicit", text=text, flag=found.group(1).upper() == "ON")
    if _SET.match(text):
        return Step("noop", text=text)   # SET NOCOUNT, TEXTSIZE, ANSI_*, ISOLATION LEVEL
    return None


def _translate_sql(text: str) -> list[Step]:
    found = _TYPE_INFO_CALL.match(text)
    if found:   # FreeTDS asks for SQLGetTypeInfo this way (Microsoft's driver by RPC)
        return [Step("typeinfo", text=text, data_type=int(found.group(1)))]
    found = _PROCEDURE_CALL.match(text)
    if found:   # there are no other procedures here
        raise TranslationError(2812, f"Could not find stored procedure '{found.group(1)}'.",
                               severity=16, state=62)
    try:
        trees = [tree for tree in sqlglot.parse(text, read="tsql") if tree is not None]
    except (ParseError, TokenError) as exc:
        raise TranslationError(102, f"Incorrect syntax near '{_near(text, exc)}'.") from None
    steps = []
    for tree in trees:
        if isinstance(tree, exp.Command) or tree.find(exp.Command) is not None:
            word = text.split()[0] if text.split() else text
            raise TranslationError(102, f"Incorrect syntax near '{word}'.")
        tables = table_locking(tree)
        tree = tree.transform(_rewrite)
        params = sorted({p.name for p in tree.find_all(exp.Placeholder) if p.name})
        try:
            sql = tree.sql("sqlite", unsupported_level=sqlglot.ErrorLevel.IGNORE)
        except Exception as exc:  # sqlglot cannot write it for SQLite
            raise TranslationError(102, f"Incorrect syntax near '{text.split()[0]}'.") from exc
        returns_rows = isinstance(tree, (exp.Select, exp.Union, exp.Except, exp.Intersect)) or \
            bool(tree.args.get("returning"))
        steps.append(Step("sql", sql=sql, text=text, params=params, returns_rows=returns_rows,
                          tables=tables))
    return steps


def _near(text: str, exc: Exception) -> str:
    errors = getattr(exc, "errors", None) or []
    highlight = errors[0].get("highlight") if errors else None
    return (highlight or (text.split() or [""])[0])[:128]


def _rewrite(node: exp.Expression) -> exp.Expression:
    """One node of the T-SQL tree, made into what SQLite can run."""
    if isinstance(node, exp.Parameter):
        inner = node.this
        if isinstance(inner, exp.Parameter):          # @@NAME
            name = inner.name.lower()
            function = GLOBAL_VARIABLES.get(name)
            if function is None:
                raise TranslationError(137, f"Must declare the scalar variable \"@@{inner.name}\".")
            return exp.Anonymous(this=function, expressions=[])
        return exp.Placeholder(this=node.name)          # @P1 -> :P1
    if isinstance(node, exp.Table):
        key = (node.args.get("db") and node.args["db"].name.lower(), node.name.lower())
        view = CATALOG_VIEWS.get(key)
        if view is not None:
            node = node.copy()
            node.set("this", exp.to_identifier(view))
        if node.args.get("db") is not None:
            node = node.copy() if view is None else node
            node.set("db", None)
            node.set("catalog", None)
        return node
    if isinstance(node, exp.Column):
        if node.args.get("db") is not None:
            key = (node.args["db"].name.lower(), node.table.lower())
            node = node.copy()
            if key in CATALOG_VIEWS:
                node.set("table", exp.to_identifier(CATALOG_VIEWS[key]))
            node.set("db", None)
            node.set("catalog", None)
        if node.table.lower() in ("inserted", "deleted") and isinstance(
                node.parent.parent if isinstance(node.parent, exp.Alias) else node.parent,
                exp.Returning):
            node = node.copy()
            node.set("table", None)
        return node
    if isinstance(node, exp.Values) and node.args.get("alias") is not None \
            and node.args["alias"].columns:
        # (VALUES ...) AS t(a, b), SQLAlchemy's insertmanyvalues on SQL Server: SQLite
        # names a VALUES table's columns column1, column2, ... and takes no alias list.
        alias = node.args["alias"]
        values = node.copy()
        values.set("alias", None)
        values = values.transform(_rewrite)      # its @P1 placeholders
        select = exp.select(*[exp.alias_(exp.column(f"column{index}"), column.name)
                              for index, column in enumerate(alias.columns, 1)]).from_(values)
        return exp.Subquery(this=select, alias=exp.TableAlias(this=alias.this.copy()))
    if isinstance(node, exp.National):                 # N'...' -> '...'
        return exp.Literal.string(node.this)
    if isinstance(node, exp.CurrentSchema):
        return exp.Literal.string("dbo")
    if isinstance(node, exp.Anonymous):
        name = node.name.lower()
        if name == "scope_identity":
            return exp.Anonymous(this="last_insert_rowid", expressions=[])
        if name == "schema_name":
            return exp.Literal.string("dbo")
    if isinstance(node, exp.Literal) and node.is_string and node.find_ancestor(
            exp.DateDiff, exp.DateAdd, exp.Cast) is not None:
        found = _ISO_DAY.match(node.this)
        if found:                                      # '19700101' -> '1970-01-01'
            return exp.Literal.string("-".join(found.groups()))
    if isinstance(node, exp.DataType):
        return _sqlite_type(node)
    return node


def _sqlite_type(node: exp.DataType) -> exp.Expression:
    """Column types keep their T-SQL names (SQLite accepts any name, and the name is
    how a result column's SQL Server type is known again, see types.py); an
    IDENTITY column becomes SQLite's rowid alias."""
    if not isinstance(node.parent, exp.ColumnDef):
        # CAST targets: SQLite's own types, without (MAX)
        text = node.sql("sqlite").split("(")[0]
        return exp.DataType(this=exp.DataType.Type.USERDEFINED, kind=text)
    text = node.sql("tsql").upper().replace("(MAX)", "")   # SQLite wants numbers there
    if text.startswith("BIGINT") or text.startswith("INT"):
        definition = node.parent
        if any(isinstance(c.args.get("kind"), exp.GeneratedAsIdentityColumnConstraint)
               for c in definition.args.get("constraints") or []):
            text = "INTEGER"
    return exp.DataType(this=exp.DataType.Type.USERDEFINED, kind=text)


def translate_batch(batch: str) -> list[Step]:
    """The steps of one T-SQL batch (several statements are allowed)."""
    steps: list[Step] = []
    for text in _split(batch):
        control = _control_step(text)
        if control is not None:
            steps.append(control)
        else:
            steps.extend(_translate_sql(text))
    return steps
