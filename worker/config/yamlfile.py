"""Reading the YAML file: the data, the line of every key path, env expansion.

Errors name the line (YAML's marks), so the schema can point at the exact key;
`${VAR}` and `${VAR:-default}` are expanded after parsing, in values only.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import stat
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
    text = _read_regular_file(path)
    with _gc_paused():
        return _parse(text, path)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _read_regular_file(path: Path) -> str:
    """The file's text; ConfigError unless it is a regular file. Opened without
    blocking and checked on the open descriptor: opening a FIFO would wait for a
    writer for ever, and a device such as /dev/zero never ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError("file not found (pass -c PATH or set "
                          f"${CONFIG_ENV_VAR})", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}",
                          path=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise ConfigError(f"cannot read the file: it is {kind}, not a regular file",
                              path=path)
        with open(fd, "rb", closefd=False) as file:
            return file.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", path=path) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def _gc_paused():
    """The cyclic GC off while a document's objects are built: they are acyclic
    (a recursive alias is refused), and the collections that their numbers
    trigger took 3 of the 4 CPU seconds of reading a 30,000-job file."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loader_class() -> type:
    """libyaml's parser when PyYAML was built with it (it keeps line marks), else
    PyYAML's pure-Python one: the same documents, about 5 times slower."""
    base = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    return type("MarkedValueLoader", (_MarkedValueErrors, base), {})


class _MarkedValueErrors:
    """A scalar that YAML types but Python cannot build (`2026-02-30`, an integer of
    5,000 digits) raises a bare ValueError: make it a marked YAML error, so that it
    is a config error naming its line, not a traceback."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            shown = node.value if len(str(node.value)) <= 40 else f"{str(node.value)[:40]}..."
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {shown!r}: {str(exc)[:120]}",
                node.start_mark) from None


def _parse(text: str, path: Path) -> YamlDocument:
    loader = _loader_class()(text)
    document = YamlDocument(data=None, lines={})
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:   # the pure-Python composer recurses per level
            raise _too_deep(path, None) from None
        if node is not None:
            # Before constructing: construction flattens merge keys (<<: *base)
            # in place, which would look like duplicate keys; and it recurses per
            # level, so the depth must be known to be sane first.
            _index_lines(node, document, path)
            document.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        if "maximum nesting depth" in problem:   # libyaml's own limit, 1000 levels
            raise _too_deep(path, mark.line + 1 if mark else None) from None
        if mark is not None and _tab_in_indentation(text, mark):
            problem += " (YAML does not allow tabs for indentation; use spaces)"
        raise ConfigError(f"invalid YAML: {problem}", path=path,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from None
    finally:
        loader.dispose()
    return document


def _tab_in_indentation(text: str, mark: yaml.Mark) -> bool:
    lines = text.splitlines()
    if mark.line >= len(lines):
        return False
    line = lines[mark.line]
    indentation = line[:len(line) - len(line.lstrip(" \t"))]
    return "\t" in indentation or line[mark.column:mark.column + 1] == "\t"


# A document may nest this deep (a valid config nests about 6 levels) ...
MAX_DEPTH = 100
# ... and its aliases may expand it to this many nodes, or to this many times the
# nodes written in the file if that is more: a 572-byte "billion laughs" file
# would otherwise expand to 10^9 nodes (1.8 GB) in whatever walks it.
MAX_EXPANDED_NODES = 100_000
MAX_EXPANSION_FACTOR = 10


def _index_lines(root: yaml.Node, document: YamlDocument, path: Path) -> None:
    """Fill document.lines (each key path's line) and document.quoted; refuse
    duplicate keys, and a document that nests deeper than MAX_DEPTH, contains
    itself, or whose aliases expand it past the limit. This walk is the one that
    sees the document with its aliases expanded (as the data will be), so it
    counts what it visits and stops at the limit, before the cost grows."""
    lines, quoted = document.lines, document.quoted
    lines[()] = root.start_mark.line + 1
    if root.id == "scalar":
        return
    allowed = MAX_EXPANDED_NODES   # raised to the file's own size once it is passed
    visited = 1
    stack: list = [(root, (), None)]    # (collection node, its key path, its job)
    while stack:
        node, at, job = stack.pop()
        if len(at) >= MAX_DEPTH - 1 and node.value:   # its items would be too deep
            _refuse_cycle(root, path)
            raise _too_deep(path, _children(node)[0].start_mark.line + 1)
        below = []
        if node.id == "mapping":
            if len(at) == 2 and at[0] == "jobs":
                job = next((v.value for k, v in node.value if k.value == "name"
                            and v.id == "scalar"), None)
            seen: set = set()
            merged = _merged_pairs(node)
            merged_keys = {id(key_node) for key_node, _ in merged}
            for key_node, value_node in [p for p in node.value if not _is_merge(p[0])] + merged:
                if key_node.id != "scalar":
                    raise ConfigError("invalid YAML: a key must be a single value, not "
                                      "a list or a mapping", path=path,
                                      line=key_node.start_mark.line + 1)
                key = key_node.value
                if key in seen and id(key_node) in merged_keys:
                    continue   # a merged key that the mapping sets itself
                if key in seen:
                    where = at[2:] if job is not None else at
                    raise ConfigError(f"duplicate key {key!r} in the same mapping",
                                      path=path, job=job, key=dotted(where + (key,)),
                                      line=key_node.start_mark.line + 1)
                seen.add(key)
                key_at = at + (key,)
                lines[key_at] = key_node.start_mark.line + 1
                if value_node.id == "scalar":
                    if value_node.style in _QUOTES:
                        quoted.add(key_at)   # quoted: `${VAR}` stays a string
                else:
                    below.append((value_node, key_at, job))
            visited += 2 * (len(node.value) + len(merged))
        else:
            for index, item in enumerate(node.value):
                item_at = at + (index,)
                lines.setdefault(item_at, item.start_mark.line + 1)
                if item.id == "scalar":
                    if item.style in _QUOTES:
                        quoted.add(item_at)
                else:
                    below.append((item, item_at, job))
            visited += len(node.value)
        if visited > allowed:
            allowed = _allowed_expansion(root, visited, path)
        stack.extend(reversed(below))   # document order, as the file reads


_QUOTES = ("'", '"')
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _is_merge(key_node: yaml.Node) -> bool:
    return key_node.tag == _MERGE_TAG or (key_node.id == "scalar" and key_node.value == "<<"
                                          and key_node.style is None)


def _merged_pairs(node: yaml.MappingNode, depth: int = 0) -> list:
    """The (key, value) nodes a mapping's merge keys (`<<: *common`) bring in,
    first source first, as YAML's constructor will merge them, so that the
    merged values are indexed (lines, quoting) at the path they end up at."""
    pairs: list = []
    if depth > MAX_DEPTH:
        return pairs
    for key_node, value_node in node.value:
        if not _is_merge(key_node):
            continue
        sources = value_node.value if value_node.id == "sequence" else [value_node]
        for source in sources:
            if source.id == "mapping":
                pairs.extend(p for p in source.value if not _is_merge(p[0]))
                pairs.extend(_merged_pairs(source, depth + 1))
    return pairs


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def _allowed_expansion(root: yaml.Node, visited: int, path: Path) -> int:
    """The expanded size allowed for this document; ConfigError if `visited`
    (nodes seen with aliases expanded) is already past it. The nodes written
    (each list or mapping once, with its items) are counted only once a
    document is this large."""
    seen: set[int] = set()
    written = 1
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            children = _children(node)
            written += len(children)
            stack.extend(child for child in children if child.id != "scalar")
    allowed = max(MAX_EXPANDED_NODES, MAX_EXPANSION_FACTOR * written)
    if visited > allowed:
        raise ConfigError(f"invalid YAML: its aliases expand it to more than "
                          f"{allowed:,} nodes ({written:,} written; the limit is "
                          f"{MAX_EXPANDED_NODES:,} or {MAX_EXPANSION_FACTOR} times the "
                          f"nodes written, whichever is larger)", path=path)
    return allowed


def _refuse_cycle(root: yaml.Node, path: Path) -> None:
    """ConfigError if some node contains itself (`&a [*a]`), naming its line."""
    done: set[int] = set()
    on_path: set[int] = set()
    stack: list = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            done.add(id(node))
        elif id(node) in on_path:
            raise ConfigError("invalid YAML: an alias refers to a node that contains it",
                              path=path, line=node.start_mark.line + 1)
        elif id(node) not in done:
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


def _too_deep(path: Path, line: int | None) -> ConfigError:
    return ConfigError(f"invalid YAML: nested more than {MAX_DEPTH} levels deep",
                       path=path, line=line)


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
        if "$" not in value:
            return value
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
    except (yaml.YAMLError, ValueError, RecursionError):   # a 5,000-digit number, [[[[...
        return text
    return typed if isinstance(typed, (bool, int, float)) else text
