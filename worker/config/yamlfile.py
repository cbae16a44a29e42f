"""Reading the YAML file: the data, the line of every key path, env expansion.

Errors name the line (YAML's marks), so the schema can point at the exact key;
`${VAR}` and `${VAR:-default}` are expanded after parsing, in values only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .model import CONFIG_ENV_VAR, ConfigError

KeyPath = tuple  # a key path inside the document, e.g. ("jobs", 0, "retry")


@dataclass
class YamlDocument:
    """A parsed file: its data, and where each key path starts (1-based line)."""
    data: Any
    lines: dict[KeyPath, int]
    quoted: set[KeyPath] = field(default_factory=set)   # scalars written in quotes


def read_yaml(path: Path) -> YamlDocument:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found (pass -c PATH or set "
                          f"${CONFIG_ENV_VAR})", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", path=path) from None
    loader = yaml.SafeLoader(text)
    document = YamlDocument(data=None, lines={})
    try:
        node = loader.get_single_node()
        if node is not None:
            # Before constructing: construction flattens merge keys (<<: *base)
            # in place, which would look like duplicate keys.
            _index_lines(node, (), document, path)
        document.data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        if "\t" in text and "'\\t'" in problem:
            problem += " (YAML does not allow tabs for indentation; use spaces)"
        raise ConfigError(f"invalid YAML: {problem}", path=path,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from None
    finally:
        loader.dispose()
    return document


def _index_lines(node: yaml.Node, at: KeyPath, document: YamlDocument, path: Path,
                 stack: frozenset = frozenset(), job: str | None = None) -> None:
    lines = document.lines
    if id(node) in stack:
        raise ConfigError("invalid YAML: an alias refers to a node that contains it",
                          path=path, key=dotted(at) or None,
                          line=node.start_mark.line + 1)
    stack = stack | {id(node)}
    lines.setdefault(at, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"'):
        document.quoted.add(at)   # quoted: `${VAR}` stays a string
    if isinstance(node, yaml.MappingNode):
        if len(at) == 2 and at[0] == "jobs":
            job = next((v.value for k, v in node.value if k.value == "name"
                        and isinstance(v, yaml.ScalarNode)), None)
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if isinstance(key, str) and key in seen:
                where = at[2:] if job is not None else at
                raise ConfigError(f"duplicate key {key!r} in the same mapping",
                                  path=path, job=job, key=dotted(where + (key,)),
                                  line=key_node.start_mark.line + 1)
            seen.add(key)
            lines[at + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, at + (key,), document, path, stack, job)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, at + (index,), document, path, stack, job)


def dotted(at: KeyPath) -> str:
    """A key path as the user would write it: jobs[2].retry.attempts."""
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- environment expansion ---------------------------------------------------

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_WHOLE_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Expand ${VAR} and ${VAR:-default}; '$$' is a literal '$'."""
    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        if value:  # like the shell's :-, an empty value takes the default too
            return value
        if default is not None:
            return default
        if value is not None:
            return value
        raise LookupError(f"environment variable {name} is not set and has no "
                          f"default (write ${{{name}:-default}} to give one)")
    return _ENV_REF.sub(substitute, text)


class UnsetVariable(LookupError):
    """A `${VAR}` without a default whose variable is not set; `at` is where."""

    def __init__(self, message: str, at: KeyPath) -> None:
        super().__init__(message)
        self.at = at


def expand_tree(value: Any, environ: Mapping[str, str], quoted: set[KeyPath],
                at: KeyPath = ()) -> Any:
    """`value` with env references expanded in every string, recursively."""
    if isinstance(value, str):
        try:
            expanded = expand_env(value, environ)
        except LookupError as exc:
            raise UnsetVariable(str(exc), at) from None
        if expanded != value and _WHOLE_ENV_REF.fullmatch(value.strip()) and \
                at not in quoted:
            # An unquoted value that is only `${VAR}` is typed as YAML would type it,
            # so that `max_workers: ${WORKERS:-4}` is a number and `enabled: ${ON}` a
            # bool; quote it ("${PASSWORD}") to keep it a string.
            return _yaml_scalar(expanded)
        return expanded
    if isinstance(value, dict):
        return {k: expand_tree(v, environ, quoted, at + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_tree(v, environ, quoted, at + (i,)) for i, v in enumerate(value)]
    return value


def _yaml_scalar(text: str) -> Any:
    try:
        typed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return typed if isinstance(typed, (bool, int, float)) else text
