"""Secrets out of anything shown: URL passwords and ODBC PWD=... values become ***.

Imports nothing from the rest of the package, so any module (errors, logs,
reports) can use it without an import cycle.
"""
from __future__ import annotations

import re

_URL_PASSWORD = re.compile(  # the placeholder in "user:password@host" may stay
    r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)(?!password@)[^\s'\"]*@")
_ODBC_PASSWORD = re.compile(r"(?i)\b(pwd|password)(\s*=\s*)[^;\s'\"]*")


def mask_secrets(text: str) -> str:
    """`text` with URL passwords and ODBC PWD=... values replaced by ***."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _ODBC_PASSWORD.sub(r"\1\2***", text)


def masked_url(url: str) -> str:
    """The URL as it may be shown: password replaced by ***."""
    from sqlalchemy.engine import make_url
    try:
        parsed = make_url(url)
        if parsed.query:  # e.g. mssql+pyodbc:///?odbc_connect=...;PWD=secret
            parsed = parsed.update_query_dict(
                {k: mask_secrets(v) if isinstance(v, str) else [mask_secrets(i) for i in v]
                 for k, v in parsed.query.items()})
        return parsed.render_as_string(hide_password=True)
    except Exception:  # never echo an unparsable URL: it may hold a password
        return "<unparsable URL>"
