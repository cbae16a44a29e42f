"""Database URLs as validation sees them: parsed, the dialect loaded, its driver
imported, so that a URL which can never connect fails `--check`, not start-up.

Messages name dialects and modules, never the URL itself (it may hold a password).
"""
from __future__ import annotations

from typing import Any

# The pip package that provides a DBAPI module, where the names differ or the
# usual choice is not obvious.
_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary]",
    "pymysql": "PyMySQL",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "cx_Oracle": "cx_Oracle",
}


class UrlProblem(ValueError):
    """A URL that cannot work; the message is safe to show."""


def check_url(url: str) -> Any:
    """The parsed sqlalchemy URL; UrlProblem if it does not parse, names no known
    dialect, needs a driver module that is not installed, or is asyncio-only."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise UrlProblem("not a valid SQLAlchemy URL (expected "
                         "dialect+driver://user:password@host/database)") from None
    if parsed.host and "@" in parsed.host:
        # make_url split at the first '@', so part of the password would be
        # taken for the host name (and shown, and connected to).
        raise UrlProblem("the user:password part has an '@' that is not encoded; write "
                         "each '@' in the user name or password as %40 "
                         "(e.g. user:p%40ss@host)")
    name = parsed.drivername
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise UrlProblem(f"unknown dialect {name!r}{_closest_dialect(name)}") from None
    if getattr(dialect, "is_async", False):
        raise UrlProblem(f"{name!r} is an asyncio driver; jobs run in threads and need "
                         f"a synchronous one (e.g. postgresql+psycopg2, mysql+pyodbc)")
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = exc.name or dialect.driver
        package = _PACKAGES.get(module, module)
        raise UrlProblem(f"dialect {name!r} needs the Python module {module!r}, which "
                         f"cannot be imported ({exc}); install it: pip install "
                         f"{package}") from None
    return parsed


def _closest_dialect(name: str) -> str:
    """'; did you mean ...?' from SQLAlchemy's own dialects, or ''. Imports every
    dialect module, so only on this error path."""
    import difflib
    import importlib
    import pkgutil

    known = ["postgresql", "mysql", "mariadb", "sqlite", "mssql", "oracle"]
    for backend in ("postgresql", "mysql", "sqlite", "mssql", "oracle"):
        package = importlib.import_module(f"sqlalchemy.dialects.{backend}")
        for module in pkgutil.iter_modules(package.__path__):
            try:
                if hasattr(importlib.import_module(f"{package.__name__}.{module.name}"),
                           "dialect"):
                    known.append(f"{backend}+{module.name}")
            except Exception:  # a module that cannot load only costs a suggestion
                continue
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if hint:
        return f"; did you mean {hint[0]!r}?"
    return "; known: " + ", ".join(sorted(k for k in known if "+" not in k))
