"""Secrets out of anything shown: `mask_secrets(text)` for any text that is
printed or logged, `masked_url(url)` for a database URL.

A credential is a URL's password, or the value of any key whose name says
password, passwd, pwd, secret, token or key (case-insensitive), in a URL's query
(`?PWD=...&api_token=...`), in an ODBC connection string (`UID=u;PWD=...`, a
braced `PWD={a;b}}c}` included), in a percent-encoded `odbc_connect=...`, or as
a quoted key in a dict or JSON (`'password': '...'`). A value a server quotes
back from a failed statement (a duplicate key, a failing row) is a bind parameter
and is masked too. Masking errs towards hiding too much: a URL's user:password
part is masked up to its last '@'.

Imports nothing from the rest of the package, so any module (errors, logs,
reports) can use it without an import cycle.
"""
from __future__ import annotations

import re

MASK = "***"

# A key name that says it holds a credential (PWD, password, api_key, AccessToken...).
_KEY = r"[A-Za-z0-9_.\-]*(?:password|passwd|pwd|secret|token|key)[A-Za-z0-9_.\-]*"

# scheme://user:password@  (greedy to the last '@' before a space or quote, so an
# unencoded '@' in the password does not leave its tail in clear; the user name
# may hold an '@', as Azure's user@server does). The placeholder in
# "user:password@host" may stay.
_URL_PASSWORD = re.compile(
    r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/\s'\"]*:)(?!password@)[^\s'\"]*@")

# KEY=value in a query string or an ODBC string; an ODBC value may be braced,
# with '}}' for a literal '}', and may then hold ';' and spaces.
_PLAIN_PAIR = re.compile(
    r"(?i)(?<![A-Za-z0-9_.\-])(" + _KEY + r")(\s*=\s*)"
    r"(\{(?:[^}]|\}\})*\}(?!\})|\{.*|[^;&\s'\"]*)")

# The same, percent-encoded (an odbc_connect value inside a URL):
# PWD%3Dvalue%3B or PWD%3D%7B...%7D%3B
_ENCODED_PAIR = re.compile(
    r"(?i)(?<![A-Za-z0-9_.\-])(" + _KEY + r")(%3D)"
    r"(%7B(?:%7D%7D|(?!%7D).)*%7D|%7B.*|(?:(?!%3B)[^&\s'\"])*)")

# 'password': 'value' or "token": "value" (a dict's repr, JSON).
_QUOTED_PAIR = re.compile(
    r"(?i)(['\"])(" + _KEY + r")\1(\s*:\s*)(['\"])((?:\\.|(?!\4).)*)\4")


_KEY_WORDS = ("pass", "pwd", "secret", "token", "key")

# Values a server quotes back from the failed statement (hide_parameters cannot
# reach them: they are in the server's own message): MariaDB/MySQL's duplicate
# entry (1062) and incorrect value (1366, 1292); PostgreSQL's DETAIL key and
# failing row, and its invalid input; SQL Server's duplicate key value (2627, 2601).
# (marker substring, pattern whose groups 1 and 2 surround the value)
_ECHOED_VALUES = (
    ("Duplicate entry '", re.compile(r"(Duplicate entry ').*?(' for key)")),
    (" value: '", re.compile(r"(Incorrect [\w ]+ value: ').*?(' for column)")),
    ("Key (", re.compile(r"(Key \(.*?\)=\().*?(\) (?:already exists|is not present in|"
                         r"conflicts with))")),
    ("Failing row contains (", re.compile(
        r"(Failing row contains \().*?(\)\.?)(?=\s*$|\\n|\n|[\"'])", re.MULTILINE)),
    ("invalid input ", re.compile(r"(invalid input (?:syntax|value) for [\w ]+: \").*?(\")")),
    ("duplicate key value is (", re.compile(r"(duplicate key value is \().*?(\)\.)")),
)


def mask_secrets(text: str) -> str:
    """`text` with every credential it contains replaced by ***."""
    if not isinstance(text, str):
        text = str(text)
    # Cheap tests first: this runs on every log line, and most hold no URL and
    # no credential-shaped key (under 1 us instead of 25 for a typical line).
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\1" + MASK + "@", text)
    for marker, pattern in _ECHOED_VALUES:
        if marker in text:
            text = pattern.sub(lambda m: m.group(1) + MASK + m.group(2), text)
    lowered = text.lower()
    if not any(word in lowered for word in _KEY_WORDS):
        return text
    text = _PLAIN_PAIR.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    text = _ENCODED_PAIR.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    return _QUOTED_PAIR.sub(
        lambda m: m.group(1) + m.group(2) + m.group(1) + m.group(3) + m.group(4) + MASK +
        m.group(4), text)


def is_credential_key(name: str) -> bool:
    """Whether a query or connection-string key names a credential."""
    return re.fullmatch(_KEY, name, re.IGNORECASE) is not None


def masked_url(url: str) -> str:
    """The URL as it may be shown: its password, every credential-shaped query
    value and every credential inside a query value (odbc_connect) as ***."""
    from sqlalchemy.engine import make_url
    try:
        parsed = make_url(url)
        if parsed.host and "@" in parsed.host:
            # An unencoded '@' in the password: SQLAlchemy split at the first one,
            # so the rest of the password is in `host`. Validation refuses such a
            # URL; here, show none of it.
            parsed = parsed.set(host=parsed.host.rsplit("@", 1)[1], password=MASK)
        if parsed.query:
            parsed = parsed.update_query_dict(
                {key: _masked_query_value(key, value) for key, value in parsed.query.items()})
        shown = parsed.render_as_string(hide_password=True)
    except Exception:  # never echo an unparsable URL: it may hold a password
        return "<unparsable URL>"
    return shown.replace("%2A%2A%2A", MASK)


def _masked_query_value(key: str, value: str | tuple[str, ...]) -> str | list[str]:
    if isinstance(value, str):
        return MASK if is_credential_key(key) else mask_secrets(value)
    return [_masked_query_value(key, item) for item in value]
