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

from . import catalog
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
    **catalog.NAMES,
}
# @@variables -> functions each connection registers.
GLOBAL_VARIABLES = {"spid": "tds_spid", "trancount": "tds_trancount",
                    "version": "tds_version", "servername": "tds_servername",
                    "rowcount": "tds_rowcount", "error": "tds_error",
                    "identity": "last_insert_rowid"}
_INTEGER_TYPES = {"INT", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "BIT"}
_NUMBER_TYPES = _INTEGER_TYPES | {"FLOAT", "REAL", "DOUBLE", "DECIMAL", "NUMERIC", "MONEY",
                                  "SMALLMONEY"}
_TEXT_TYPES = {"NVARCHAR", "VARCHAR", "NCHAR", "CHAR", "TEXT", "NTEXT"}
_SIZED_TYPES = {"NVARCHAR", "VARCHAR", "NCHAR", "CHAR", "VARBINARY", "BINARY"}
LENGTH_CHECK = "tds_len__"      # CHECK constraints holding declared lengths: 2628


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
    table: str = ""           # sql INSERT / truncate / identity_insert: the target table
    columns: tuple = ()       # sql INSERT: the columns named
    before: "Step | None" = None   # UPDATE ... OUTPUT deleted.*: SELECT rowid, old values
    output: tuple = ()        # with before: per OUTPUT column, ("deleted"|"inserted", index)
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
_OPTION = re.compile(r"^\s*SET\s+(\w+)\s+(ON|OFF|-?\d+)\s*;?\s*$", re.I)
_IDENTITY_INSERT = re.compile(r"^\s*SET\s+IDENTITY_INSERT\s+([\w.\[\]]+)\s+(ON|OFF)\s*;?\s*$", re.I)
# SET options whose value is SQL Server's default for these drivers: nothing to do.
_DEFAULT_OPTIONS = {("ANSI_NULLS", "ON"), ("ANSI_WARNINGS", "ON"), ("ANSI_PADDING", "ON"),
                    ("ANSI_NULL_DFLT_ON", "ON"), ("QUOTED_IDENTIFIER", "ON"),
                    ("CONCAT_NULL_YIELDS_NULL", "ON"), ("ARITHABORT", "ON"),
                    ("IMPLICIT_TRANSACTIONS", "OFF"), ("NUMERIC_ROUNDABORT", "OFF"),
                    ("CURSOR_CLOSE_ON_COMMIT", "OFF"), ("ANSI_DEFAULTS", "ON")}
_PROCEDURE_CALL = re.compile(r"^\s*(?:EXEC(?:UTE)?\s+)?((?:\[?\w+\]?\.)*\[?sp_\w+\]?)(?:\s|$)", re.I)
_TYPE_INFO_CALL = re.compile(r"^\s*(?:EXEC(?:UTE)?\s+)?(?:\[?sys\]?\.)?\[?sp_datatype_info(?:_100)?\]?"
                             r"\s+(-?\d+)", re.I)
_ISO_DAY = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


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
    if re.match(r"^\s*SET\s+(LOCK_TIMEOUT\s+-?\d+|DEADLOCK_PRIORITY\s+(LOW|NORMAL|HIGH|-?\d+))\s*;?\s*$",
                text, re.I):
        return Step("noop", text=text)   # the lock manager's (session._set_option)
    found = _OPTION.match(text)
    if found:
        name, value = found.group(1).upper(), found.group(2).upper()
        if name in ("NOCOUNT", "XACT_ABORT"):
            return Step("option", text=name, flag=value == "ON")
        if (name, value) in _DEFAULT_OPTIONS or name in ("TEXTSIZE", "ROWCOUNT") and value == "0" \
                or name == "TEXTSIZE":
            return Step("noop", text=text)
        raise not_modelled(f"SET {name} {value}")
    found = _IDENTITY_INSERT.match(text)
    if found:
        return Step("identity_insert", table=_bare_name(found.group(1)),
                    flag=found.group(2).upper() == "ON")
    if re.match(r"^\s*SET\s+TRANSACTION\s+ISOLATION\s+LEVEL\s+(READ\s+UNCOMMITTED|READ\s+COMMITTED|"
                r"REPEATABLE\s+READ|SERIALIZABLE)\s*;?\s*$", text, re.I):
        return Step("noop", text=text)   # the lock manager's (session._set_option)
    if _SET.match(text):
        raise not_modelled(" ".join(text.split()[:4]))
    return None


def _bare_name(name: str) -> str:
    """dbo.[t] -> t"""
    return name.split(".")[-1].strip("[]\"")


def _translate_sql(text: str) -> list:
    found = _PROCEDURE_CALL.match(text)
    if found:   # there are no other procedures here
        raise TranslationError(2812, f"Could not find stored procedure '{found.group(1)}'.",
                               severity=16, state=62)
    text = _SYSDATETIME.sub("TDS_SYSDATETIME(", text)
    text, output = _cut_delete_output(text)
    try:
        trees = [tree for tree in sqlglot.parse(text, read="tsql") if tree is not None]
    except (ParseError, TokenError) as exc:
        raise TranslationError(102, f"Incorrect syntax near '{_near(text, exc)}'.") from None
    steps = []
    for tree in trees:
        if isinstance(tree, exp.Command) or tree.find(exp.Command) is not None:
            word = text.split()[0] if text.split() else text
            raise TranslationError(102, f"Incorrect syntax near '{word}'.")
        _refuse_unmodelled(tree)
        if output is not None:
            tree.set("returning", output)
        assignment = _assignment(tree)
        if assignment is not None:
            steps.append(assignment)
            continue
        if isinstance(tree, exp.TruncateTable):
            steps.append(Step("truncate", text=text, table=tree.expressions[0].name))
            continue
        if isinstance(tree, exp.Create) and isinstance(tree.this, exp.Schema):
            _column_rules(tree)
        tree = _limit_recursion(tree)
        steps.append(_sql_step(tree, text))
    return steps


def _sql_step(tree: exp.Expression, text: str) -> Step:
    table, columns, before, output = "", (), None, ()
    returning = tree.args.get("returning")
    if isinstance(tree, exp.Insert):
        target = tree.this
        table = (target.this if isinstance(target, exp.Schema) else target).name
        if isinstance(target, exp.Schema):
            columns = tuple(column.name.lower() for column in target.expressions)
        if returning is not None and _output_sources(returning) - {"inserted"}:
            raise _unbound(returning, "deleted")
    if isinstance(tree, exp.Update) and returning is not None and \
            "deleted" in _output_sources(returning):
        before, output = _old_values(tree, returning)
    tables = table_locking(tree)
    tree = tree.transform(_rewrite)
    params = sorted({p.name for p in tree.find_all(exp.Placeholder) if p.name})
    sql = _sqlite(tree, text)
    returns_rows = isinstance(tree, (exp.Select, exp.Union, exp.Except, exp.Intersect)) or \
        bool(tree.args.get("returning"))
    return Step("sql", sql=sql, text=text, params=params, returns_rows=returns_rows,
                table=table, columns=columns, before=before, output=output, tables=tables)


def _sqlite(tree: exp.Expression, text: str) -> str:
    try:
        return tree.sql("sqlite", unsupported_level=sqlglot.ErrorLevel.IGNORE)
    except Exception as exc:  # sqlglot cannot write it for SQLite
        raise TranslationError(102, f"Incorrect syntax near '{text.split()[0]}'.") from exc


_SYSDATETIME = re.compile(r"\bSYSDATETIME\s*\(", re.I)
_UNMODELLED_NODES = {exp.Merge: "MERGE"}


def _refuse_unmodelled(tree: exp.Expression) -> None:
    for kind, construct in _UNMODELLED_NODES.items():
        if isinstance(tree, kind) or tree.find(kind) is not None:
            raise not_modelled(construct)
    returning = tree.args.get("returning")
    if returning is not None and returning.args.get("into"):
        raise not_modelled("OUTPUT ... INTO")
    for table in tree.find_all(exp.Table):
        if table.name.startswith("#"):
            raise not_modelled("temporary tables (#name)")


def _output_sources(returning: exp.Expression) -> set[str]:
    return {column.table.lower() for column in returning.find_all(exp.Column) if column.table}


def _unbound(returning: exp.Expression, source: str) -> TranslationError:
    column = next(c for c in returning.find_all(exp.Column) if c.table.lower() == source)
    return TranslationError(4104, f'The multi-part identifier "{column.table}.{column.name}" '
                            "could not be bound.", severity=16)


def _cut_delete_output(text: str) -> tuple[str, exp.Returning | None]:
    """DELETE ... OUTPUT deleted.x ... (which sqlglot does not read): the statement
    without its OUTPUT clause, and the clause as SQLite's RETURNING."""
    if not re.match(r"^\s*DELETE\b", text, re.I) or not re.search(r"\bOUTPUT\b", text, re.I):
        return text, None
    from sqlglot.dialects.tsql import TSQL
    tokens = TSQL().tokenize(text)
    depth, begin, end = 0, None, len(text)
    for token in tokens:
        word = token.text.upper() if token.token_type.name not in _NOT_WORDS else None
        depth += token.text == "("
        depth -= token.text == ")"
        if depth == 0 and begin is None and word == "OUTPUT":
            begin = token
        elif depth == 0 and begin is not None and word in ("FROM", "WHERE", "OPTION", "INTO"):
            if word == "INTO":
                raise not_modelled("OUTPUT ... INTO")
            end = token.start
            break
    if begin is None:
        return text, None
    clause = text[begin.end + 1:end]
    returning = exp.Returning(expressions=_translate_select_list(clause))
    if _output_sources(returning) - {"deleted"}:
        raise _unbound(returning, "inserted")
    return text[:begin.start] + " " + text[end:], returning


def _translate_select_list(clause: str) -> list:
    try:
        return sqlglot.parse_one(f"SELECT {clause}", read="tsql").expressions
    except (ParseError, TokenError) as exc:
        raise TranslationError(102, f"Incorrect syntax near '{_near(clause, exc)}'.") from None


def _old_values(tree: exp.Update, returning: exp.Returning) -> tuple[Step, tuple]:
    """UPDATE ... OUTPUT deleted.x: SQLite's RETURNING sees only new values, so the old
    ones are read first (by rowid) and joined to the RETURNING rows."""
    if tree.args.get("from") or tree.args.get("limit") or tree.args.get("joins"):
        raise not_modelled("UPDATE ... FROM or TOP with OUTPUT deleted")
    old, new, output = [], [], []
    for expression in returning.expressions:
        sources = _output_sources(expression)
        if len(sources) != 1 or expression.find(exp.Star) is not None:
            raise not_modelled("OUTPUT mixing deleted and inserted, or deleted.*")
        inner = expression.this if isinstance(expression, exp.Alias) else expression
        name = expression.alias_or_name
        inner = inner.copy()
        for column in inner.find_all(exp.Column):
            column.set("table", None)
        if sources == {"deleted"}:
            old.append(inner)
            output.append(("deleted", len(old), name))
        else:
            new.append(inner)
            output.append(("inserted", len(new), name))
    select = exp.select(exp.column("rowid"), *old).from_(tree.this.copy())
    if tree.args.get("where"):
        select.set("where", tree.args["where"].copy())
    tree.set("returning", exp.Returning(expressions=[exp.column("rowid"), *new]))
    return _sql_step(select, "SELECT"), tuple(output)


def _assignment(tree: exp.Expression):
    """SELECT @x = expression FROM ...: the variable gets the last row's value."""
    if not isinstance(tree, exp.Select):
        return None
    assigned = [e for e in tree.expressions
                if isinstance(e, exp.EQ) and isinstance(e.this, exp.Parameter)]
    if not assigned:
        return None
    if len(assigned) != len(tree.expressions):
        raise TranslationError(141, "A SELECT statement that assigns a value to a variable "
                               "must not be combined with data-retrieval operations.")
    if len(assigned) > 1:
        raise not_modelled("SELECT assigning several variables")
    select = tree.copy()
    select.set("expressions", [assigned[0].expression.copy()])
    return Assign(assigned[0].this.name, _sql_step(select, "SELECT"), select=True)


def _limit_recursion(tree: exp.Expression) -> exp.Expression:
    """A recursive CTE stops with 530 past OPTION (MAXRECURSION n), 100 by default: each
    recursive row carries its level, checked by tds_recursion()."""
    limit = 100
    for option in tree.args.get("options") or []:
        if option.this.name.upper() != "MAXRECURSION":
            raise not_modelled(f"OPTION ({option.sql('tsql')})")
        limit = int(option.expression.name)
    if tree.args.get("options"):
        tree.set("options", None)
    with_ = tree.args.get("with_") or tree.args.get("with")
    if with_ is None or limit == 0:
        return tree
    for cte in list(with_.expressions):
        name, body = cte.alias, cte.this
        if not isinstance(body, exp.Union) or not isinstance(body.this, exp.Select):
            continue
        recursive = body.expression
        references = [t for t in recursive.find_all(exp.Table) if t.name.lower() == name.lower()]
        if not references:
            continue
        alias = cte.args["alias"]
        columns = ([c.name for c in alias.columns] if alias.columns
                   else [e.alias_or_name for e in body.this.expressions])
        levels = f"{name}__tds_levels"
        body.this.append("expressions", exp.alias_(exp.Literal.number(0), "tds_level"))
        reference = references[0]
        seen_as = reference.alias or name
        reference.set("this", exp.to_identifier(levels))
        if not reference.alias:
            reference.set("alias", exp.TableAlias(this=exp.to_identifier(name)))
        recursive.append("expressions", exp.alias_(exp.Anonymous(this="tds_recursion", expressions=[
            exp.column("tds_level", table=seen_as), exp.Literal.number(limit)]), "tds_level"))
        new_alias = exp.TableAlias(this=exp.to_identifier(levels))
        if alias.columns:
            new_alias.set("columns", [c.copy() for c in alias.columns] + [exp.to_identifier("tds_level")])
        cte.set("alias", new_alias)
        visible = exp.CTE(this=exp.select(*[exp.column(c) for c in columns]).from_(levels),
                          alias=exp.TableAlias(this=exp.to_identifier(name)))
        index = with_.expressions.index(cte)
        with_.expressions.insert(index + 1, visible)
        with_.set("expressions", with_.expressions)
    return tree


def _column_rules(tree: exp.Create) -> None:
    """CREATE TABLE: declared lengths become CHECK constraints (2628), text columns
    compare case-insensitively (CI_AS) unless a _CS_ or _BIN collation is given, and
    types this server cannot keep exactly are refused."""
    table = tree.this.this.name
    for definition in tree.find_all(exp.ColumnDef):
        kind = definition.args.get("kind")
        if kind is None:
            continue
        name = kind.this.name.upper()
        tsql_name = kind.sql("tsql").split("(")[0].upper()
        params = [p.this for p in kind.expressions]
        constraints = definition.args.get("constraints") or []
        for constraint in constraints:
            identity = constraint.args.get("kind")
            if isinstance(identity, exp.GeneratedAsIdentityColumnConstraint):
                start, step = identity.args.get("start"), identity.args.get("increment")
                if (start is not None and start.name != "1") or (step is not None and step.name != "1"):
                    raise not_modelled("IDENTITY with a seed or increment other than 1")
        if tsql_name in ("DECIMAL", "NUMERIC"):
            precision = int(params[0].name) if params else 18
            scale = int(params[1].name) if len(params) > 1 else 0
            if not (precision <= 15 or (scale == 0 and precision <= 18)):
                raise not_modelled(f"{tsql_name}({precision},{scale}): decimals are exact here "
                                   "up to 15 digits (18 without a scale)")
        if tsql_name in _SIZED_TYPES:
            if params and isinstance(params[0], exp.Literal):
                length = int(params[0].name)
            elif params:
                length = None                                   # (MAX)
            else:
                length = 1
            if length is not None:
                column = definition.name
                check = exp.ColumnConstraint(
                    this=exp.to_identifier(f"{LENGTH_CHECK}{table}__{column}__{length}", quoted=True),
                    kind=exp.CheckColumnConstraint(this=exp.LTE(
                        this=exp.Anonymous(this="length", expressions=[exp.column(column, quoted=True)]),
                        expression=exp.Literal.number(length))))
                constraints.append(check)
        if tsql_name in _TEXT_TYPES:
            collate = [c for c in constraints if isinstance(c.args.get("kind"), exp.CollateColumnConstraint)]
            sensitive = any(re.search(r"_CS_|_BIN", c.args["kind"].this.name, re.I) for c in collate)
            for constraint in collate:
                constraints.remove(constraint)
            if not sensitive:
                constraints.append(exp.ColumnConstraint(kind=exp.CollateColumnConstraint(
                    this=exp.to_identifier("NOCASE"))))
        definition.set("constraints", constraints)


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
    return _rewrite_expression(node)


# SQL Server's arithmetic and conversions, by functions each connection registers
# (functions.py): 'a' + 'b' concatenates, 1/0 is 8134, CAST('abc' AS INT) is 245.
_OPERATORS = {exp.Add: "tds_add", exp.Div: "tds_div", exp.Mod: "tds_mod"}


def _rewrite_expression(node: exp.Expression) -> exp.Expression:
    function = _OPERATORS.get(type(node))
    if function is not None and node.find_ancestor(exp.ColumnDef) is None:
        return exp.Anonymous(this=function, expressions=[node.this.transform(_rewrite),
                                                         node.expression.transform(_rewrite)])
    if isinstance(node, exp.Cast):
        target = node.to.sql("tsql").split("(")[0].upper()
        if target in _NUMBER_TYPES:
            scale = node.to.expressions[1].this if len(node.to.expressions) > 1 else exp.Literal.number(0)
            return exp.Anonymous(this="tds_cast", expressions=[
                node.this.transform(_rewrite), exp.Literal.string(target), scale,
                exp.Literal.number(1 if isinstance(node, exp.TryCast) else 0)])
    if isinstance(node, exp.CurrentTimestamp):
        return exp.Anonymous(this="tds_getdate", expressions=[])
    if isinstance(node, exp.CurrentTimestampLTZ):
        return exp.Anonymous(this="tds_sysdatetimeoffset", expressions=[])
    if isinstance(node, exp.ObjectId):
        # sys.objects' object_id is the sqlite_master rowid
        return exp.Subquery(this=sqlglot.parse_one(
            "SELECT rowid FROM main.sqlite_master WHERE type IN ('table', 'view') AND "
            "name = tds_object_name(x) COLLATE NOCASE", read="sqlite").transform(
                lambda n: node.this.transform(_rewrite) if isinstance(n, exp.Column) and n.name == "x"
                else n))
    if isinstance(node, exp.Uuid):
        return exp.Anonymous(this="tds_newid", expressions=[])
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
    if text == "INTEGER":
        text = "INT"        # "INTEGER" alone is kept for IDENTITY columns (the rowid)
    if text.startswith("BIGINT") or text.startswith("INT"):
        definition = node.parent
        if any(isinstance(c.args.get("kind"), (exp.GeneratedAsIdentityColumnConstraint,
                                               exp.AutoIncrementColumnConstraint))
               for c in definition.args.get("constraints") or []):
            text = "INTEGER"
    return exp.DataType(this=exp.DataType.Type.USERDEFINED, kind=text)


# --- the batch's structure: statements, IF/ELSE, BEGIN...END, TRY/CATCH -----------------

@dataclass(frozen=True)
class If:
    condition: Step            # SELECT CASE WHEN <condition> THEN 1 ELSE 0 END
    then: list
    otherwise: list


@dataclass(frozen=True)
class Try:
    body: list
    catch: list


@dataclass(frozen=True)
class Assign:
    """DECLARE @name [= value], SET @name = value."""
    name: str
    value: Step | None         # SELECT <value>; None: NULL
    declare: bool = False
    select: bool = False       # SELECT @x = ...: no row leaves the variable as it was


@dataclass(frozen=True)
class Throw:
    arguments: Step | None     # SELECT number, message, state; None: re-throw in CATCH


@dataclass(frozen=True)
class Return:
    pass


@dataclass(frozen=True)
class While:
    condition: Step
    body: list


@dataclass(frozen=True)
class Loop:
    """BREAK (leave=True) or CONTINUE."""
    leave: bool


@dataclass(frozen=True)
class Message:
    """PRINT, or RAISERROR: severity 10 or less is a message, 11 to 19 an error."""
    text: Step                 # SELECT <message>
    severity: int = 0
    state: int = 1
    raised: bool = False       # RAISERROR (number 50000), not PRINT (0)


NOT_MODELLED = 50000           # the number of "not modelled: ..." errors


def not_modelled(construct: str) -> TranslationError:
    """A construct the server does not model: an error naming it, never a different
    answer than SQL Server's."""
    return TranslationError(NOT_MODELLED, f"not modelled: {construct} (the TDS test server "
                            "does not run it as SQL Server does)", severity=16)


# Words that begin a statement (where one ends without a semicolon).
_STARTS = {"SELECT", "INSERT", "UPDATE", "DELETE", "IF", "ELSE", "BEGIN", "END", "DECLARE",
           "SET", "COMMIT", "ROLLBACK", "SAVE", "WAITFOR", "THROW", "TRUNCATE", "CREATE",
           "DROP", "ALTER", "MERGE", "EXEC", "EXECUTE", "KILL", "PRINT", "RETURN", "WHILE",
           "WITH", "RAISERROR", "GOTO", "BREAK", "CONTINUE", "USE", "GRANT", "REVOKE", "DENY"}
_NOT_WORDS = {"STRING", "NATIONAL_STRING", "IDENTIFIER", "NUMBER", "HEX_STRING", "BIT_STRING",
              "BYTE_STRING", "RAW_STRING", "UNICODE_STRING"}
_UNMODELLED_STATEMENTS = {"MERGE": "MERGE", "GOTO": "GOTO", "USE": "USE", "GRANT": "GRANT",
                          "REVOKE": "REVOKE", "DENY": "DENY"}


class _Parser:
    """Splits a batch into statements as SQL Server does (semicolons are optional) and
    reads its control flow; each simple statement is translated by _translate_sql."""

    def __init__(self, text: str) -> None:
        from sqlglot.dialects.tsql import TSQL
        self.text = text
        try:
            self.tokens = TSQL().tokenize(text)
        except TokenError:
            raise TranslationError(102, f"Incorrect syntax near '{text.split()[0]}'.") from None
        self.pos = 0

    def word(self, index: int | None = None) -> str | None:
        index = self.pos if index is None else index
        if index >= len(self.tokens):
            return None
        token = self.tokens[index]
        if token.token_type.name in _NOT_WORDS:
            return None
        if index > 0 and self.tokens[index - 1].text == "@":
            return None                                   # @name, @@NAME
        return token.text.upper()

    def block(self, closers: tuple[str, ...]) -> list:
        nodes = []
        while self.pos < len(self.tokens):
            word = self.word()
            if word == ";":
                self.pos += 1
                continue
            if word in closers:
                return nodes
            nodes.append(self.statement())
        if closers:
            raise TranslationError(102, "Incorrect syntax near the end of the batch.")
        return nodes

    def expect(self, *words: str) -> None:
        for word in words:
            if self.pos >= len(self.tokens) or self.tokens[self.pos].text.upper() != word:
                near = self.tokens[self.pos].text if self.pos < len(self.tokens) else word
                raise TranslationError(102, f"Incorrect syntax near '{near}'.")
            self.pos += 1

    def statement(self):
        word = self.word()
        following = self.word(self.pos + 1)
        if word == "BEGIN" and following == "TRY":
            self.pos += 2
            body = self.block(("END",))
            self.expect("END", "TRY", "BEGIN", "CATCH")
            catch = self.block(("END",))
            self.expect("END", "CATCH")
            return Try(body, catch)
        if word == "BEGIN" and following not in ("TRAN", "TRANSACTION", "DISTRIBUTED"):
            self.pos += 1
            body = self.block(("END",))
            self.expect("END")
            return body
        if word == "WHILE":
            end = self.statement_end(self.pos + 1, "IF")
            condition = self.source(self.pos + 1, end)
            self.pos = end
            return While(_expression(f"CASE WHEN {condition} THEN 1 ELSE 0 END"), self.branch())
        if word in ("BREAK", "CONTINUE"):
            self.pos += 1
            return Loop(word == "BREAK")
        if word == "IF":
            end = self.statement_end(self.pos + 1, "IF")
            condition = self.source(self.pos + 1, end)
            self.pos = end
            then = self.branch()
            otherwise = []
            saved = self.pos
            while self.word() == ";":
                self.pos += 1
            if self.word() == "ELSE":
                self.pos += 1
                otherwise = self.branch()
            else:
                self.pos = saved
            return If(_expression(f"CASE WHEN {condition} THEN 1 ELSE 0 END"), then, otherwise)
        if word in ("ELSE", "END", "CATCH"):
            raise TranslationError(156, f"Incorrect syntax near the keyword '{word}'.")
        if word in _UNMODELLED_STATEMENTS:
            raise not_modelled(_UNMODELLED_STATEMENTS[word])
        end = self.statement_end(self.pos + 1, word or "")
        text = self.source(self.pos, end)
        self.pos = end
        return _simple(text)

    def branch(self) -> list:
        while self.word() == ";":
            self.pos += 1
        if self.pos >= len(self.tokens):
            raise TranslationError(102, "Incorrect syntax near the end of the batch.")
        node = self.statement()
        return node if isinstance(node, list) else [node]

    def source(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.text[self.tokens[start].start:self.tokens[end - 1].end + 1]

    def statement_end(self, index: int, first: str) -> int:
        """The index of the token that begins the next statement (or ends the block)."""
        depth = cases = 0
        body_seen = set_seen = False
        while index < len(self.tokens):
            text = self.tokens[index].text
            word = self.word(index)
            previous = self.word(index - 1) if index > 0 else None
            if text == "(":
                depth += 1
            elif text == ")":
                depth -= 1
            elif word == "CASE":
                cases += 1
            elif word == "END" and cases:
                cases -= 1
            elif depth == 0 and not cases:
                if word == ";":
                    return index
                if first == "INSERT" and word in ("VALUES", "DEFAULT"):
                    body_seen = True
                if word in _STARTS and not self._continues(index, word, previous, first,
                                                           body_seen, set_seen):
                    return index
                if word == "SELECT" or (first == "WITH" and word in ("INSERT", "UPDATE", "DELETE")):
                    body_seen = True
                if word == "SET" and first == "UPDATE":
                    set_seen = True
            index += 1
        return index

    def _continues(self, index, word, previous, first, body_seen, set_seen) -> bool:
        """Is this statement-starting word part of the current statement?"""
        if word == "SELECT":
            return (previous in ("UNION", "ALL", "EXCEPT", "INTERSECT", "AS")
                    or (first in ("INSERT", "WITH") and not body_seen))
        if word in ("INSERT", "UPDATE", "DELETE", "MERGE"):
            return (first == "WITH" and not body_seen) or previous == "ON"
        if word == "SET":
            return (first == "UPDATE" and not set_seen) or previous in ("DELETE", "UPDATE")
        if word == "IF":
            return previous in ("TABLE", "VIEW", "INDEX", "PROCEDURE", "EXISTS")
        if word == "WITH":
            return self.word(index + 1) in ("(", "TIES", "CHECK", "NOCHECK", "VALUES") or \
                self.tokens[index + 1:index + 2] and self.tokens[index + 1].text == "("
        if word in ("DROP", "ALTER"):
            return first == "ALTER"
        if word in ("EXEC", "EXECUTE"):
            return first == "INSERT"
        return False


def _expression(sql: str) -> Step:
    """A scalar T-SQL expression, as a one-row SQLite SELECT."""
    steps = _translate_sql(f"SELECT {sql}")
    return steps[0]


_VARIABLE = re.compile(r"^@(\w+)\s*(?:[\w\[\]]+(?:\s*\([^)]*\))?)?\s*(?:=\s*(.*))?$", re.S)
_SET_VARIABLE = re.compile(r"^\s*SET\s+@(\w+)\s*=\s*(.*?)\s*;?\s*$", re.I | re.S)
_THROW = re.compile(r"^\s*THROW\s*(.*?)\s*;?\s*$", re.I | re.S)


def _simple(text: str):
    """One statement that is not control flow."""
    found = re.match(r"\s*(\w+)", text)
    first = found.group(1).upper() if found else ""
    if first == "DECLARE":
        return _declare(text[len("DECLARE"):].strip().rstrip(";"))
    found = _SET_VARIABLE.match(text)
    if found:
        return [Assign(found.group(1), _expression(found.group(2)))]
    if first == "PRINT":
        return Message(_expression(text.strip().rstrip(";")[len("PRINT"):]))
    if first == "RAISERROR":
        return _raiserror(text)
    found = _THROW.match(text)
    if found:
        if not found.group(1):
            return Throw(None)
        return Throw(_expression(found.group(1)))
    if first == "RETURN":
        if text.strip().rstrip(";").upper() != "RETURN":
            raise not_modelled("RETURN with a value")
        return Return()
    control = _control_step(text)
    if control is not None:
        return control
    steps = _translate_sql(text)
    return steps[0] if len(steps) == 1 else steps


_RAISERROR = re.compile(r"^\s*RAISERROR\s*\(\s*(N?'(?:[^']|'')*')\s*,\s*(\d+)\s*,\s*(\d+)\s*\)"
                        r"\s*(?:WITH\s+NOWAIT\s*)?;?\s*$", re.I | re.S)


def _raiserror(text: str) -> Message:
    found = _RAISERROR.match(text)
    if not found:
        raise not_modelled("RAISERROR other than RAISERROR('text', severity, state)")
    severity = int(found.group(2))
    if severity > 18:
        raise not_modelled("RAISERROR with severity 19 or more")
    return Message(_expression(found.group(1)), severity, int(found.group(3)), raised=True)


def _declare(text: str) -> list:
    """DECLARE @a INT = 1, @b NVARCHAR(10): one Assign each."""
    if re.search(r"\bCURSOR\b", text, re.I):
        raise not_modelled("DECLARE CURSOR")
    if re.search(r"\bTABLE\s*\(", text, re.I):
        raise not_modelled("table variables (DECLARE @t TABLE)")
    items = [part.strip() for part in re.split(r",(?![^()]*\))(?=(?:[^']*'[^']*')*[^']*$)", text)]
    nodes = []
    for item in items:
        found = _VARIABLE.match(item)
        if not found:
            raise TranslationError(102, f"Incorrect syntax near '{item[:40]}'.")
        default = found.group(2)
        nodes.append(Assign(found.group(1), _expression(default) if default else None,
                            declare=True))
    return nodes


def _flatten(nodes) -> list:
    flat = []
    for node in nodes:
        flat.extend(_flatten(node) if isinstance(node, list) else [node])
    return flat


def translate_batch(batch: str) -> list:
    """The statements of one T-SQL batch: Steps (one statement each, or a list of
    Steps run as one statement), If, Try, Assign, Throw, Return. A statement that does
    not translate fails the whole batch before any of it runs, as a compile error does
    on SQL Server."""
    if not batch.strip():
        return []
    found = _TYPE_INFO_CALL.match(batch)
    if found:   # FreeTDS asks for SQLGetTypeInfo this way (Microsoft's driver by RPC)
        return [Step("typeinfo", text=batch, data_type=int(found.group(1)))]
    parser = _Parser(batch)
    nodes = parser.block(())
    return [_flat_if(node) for node in _flatten(nodes)]


def _flat_if(node):
    if isinstance(node, If):
        return If(node.condition, [_flat_if(n) for n in _flatten(node.then)],
                  [_flat_if(n) for n in _flatten(node.otherwise)])
    if isinstance(node, Try):
        return Try([_flat_if(n) for n in _flatten(node.body)],
                   [_flat_if(n) for n in _flatten(node.catch)])
    if isinstance(node, While):
        return While(node.condition, [_flat_if(n) for n in _flatten(node.body)])
    return node
