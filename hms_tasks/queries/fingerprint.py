"""Fingerprints of SQL statements and the HMS call site that ran them.

A *fingerprint* is a statement with every literal and placeholder replaced by ``?``, runs of
them in a list collapsed (``IN (?, ?, ?)`` and ``IN (?)`` both become ``IN (...)``, so do
``VALUES`` rows), comments dropped and whitespace squeezed. It is what the audits and the live
sampling store: the statement's shape, never a value. Tokens come from ``sqlparse``'s lexer
(the parser Django itself uses to format SQL), so a quote inside a string or a ``--`` inside a
literal cannot fool it. Double-quoted names are identifiers, not literals, and are kept.

The *call site* of a statement is the first frame, walking out from the database driver, whose
file belongs to the HMS: not Django, not hms-tasks' own modules (its demo HMS counts as HMS
code), not the standard library and not an installed package. It is ``path:line`` with the
path relative to its ``sys.path`` entry (``hms_tasks/demo/api.py:312``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import sys
import sysconfig
from functools import lru_cache
from types import FrameType

import django
from sqlparse import lexer, tokens

import hms_tasks

__all__ = ["call_site", "fingerprint", "fingerprint_id", "read_only", "scrub"]

#: Shown when no frame of the stack belongs to the HMS (a statement Django runs by itself).
UNKNOWN_SITE = "?"
_MAX_CHARS = 4000
# sqlparse's shared lexer (its default instance: stateless between calls).
_LEXER = lexer.Lexer.get_default_instance()  # type: ignore[no-untyped-call]
_SPACES = re.compile(r"\s+")
# A list of collapsed values: ``(?, ?, ?)`` -> ``(...)``; a run of such rows -> one.
_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)*\s*\)")
_ROWS = re.compile(r"\(\.\.\.\)(?:\s*,\s*\(\.\.\.\))+")
_WRITES = {"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "DROP", "ALTER", "CREATE",
           "GRANT", "REVOKE", "COPY", "CALL", "DO", "LOCK", "VACUUM", "REINDEX", "CLUSTER",
           "REFRESH", "SET", "RESET", "NOTIFY", "LISTEN", "DISCARD", "EXECUTE", "PREPARE"}


def _is_value(ttype: tokens._TokenType) -> bool:
    if ttype in tokens.Literal.String.Symbol:  # "double quoted": an identifier
        return False
    return ttype in tokens.Literal or ttype in tokens.Name.Placeholder


@lru_cache(maxsize=2048)
def fingerprint(sql: str) -> str:
    """The statement's shape: literals and placeholders as ``?``, lists as ``(...)``.

    Cached per distinct statement text (Django's statements carry placeholders, so one query
    in a loop is one entry); the cache is bounded, like everything a process keeps.
    """
    out: list[str] = []
    for ttype, value in _LEXER.get_tokens(sql):
        if ttype in tokens.Comment:
            continue
        if ttype in tokens.Whitespace or ttype in tokens.Newline or ttype in tokens.Text:
            out.append(" ")
        elif _is_value(ttype):
            # A signed number lexes as an operator and a number: keep the operator, it is no
            # value of its own.
            out.append("?")
        else:
            out.append(value)
    text = _SPACES.sub(" ", "".join(out)).strip()
    text = _ROWS.sub("(...)", _LIST.sub("(...)", text))
    return text[:_MAX_CHARS]


def scrub(text: str) -> str:
    """A plan's condition (``(given_name)::text = 'x'::text``) without its values."""
    return fingerprint(text)


def fingerprint_id(text: str) -> str:
    """A short stable id of a fingerprint (16 hex digits of its SHA-256)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_only(sql: str) -> bool:
    """Whether ``sql`` is one SELECT (or WITH ... SELECT) that writes nothing and takes no row
    locks: the only statements an audit runs EXPLAIN ANALYZE on. Conservative: a keyword that
    could write or lock (``INTO``, ``FOR``, any DML but SELECT) says no."""
    lexed = _LEXER.get_tokens(sql)
    significant = [
        (ttype, value.upper()) for ttype, value in lexed
        if not (ttype in tokens.Whitespace or ttype in tokens.Newline or ttype in tokens.Text
                or ttype in tokens.Comment)
    ]
    if not significant or significant[0][1] not in ("SELECT", "WITH"):
        return False
    for i, (ttype, value) in enumerate(significant):
        if ttype in tokens.Punctuation and value == ";" and i != len(significant) - 1:
            return False  # more than one statement
        if ttype in tokens.Keyword:
            word = value.split()[0]
            if (ttype in tokens.Keyword.DML and word != "SELECT") or word in _WRITES or word in (
                    "INTO", "FOR"):
                return False
    return True


def _excluded_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get("stdlib", ""), paths.get("platstdlib", ""), paths.get("purelib", ""),
             paths.get("platlib", ""), os.path.dirname(django.__file__),
             os.path.dirname(hms_tasks.__file__)}
    out: set[str] = set()
    for root in filter(None, roots):
        out.add(root.rstrip(os.sep) + os.sep)
        out.add(os.path.realpath(root).rstrip(os.sep) + os.sep)
    return tuple(sorted(out))


_HMS_TASKS = os.path.dirname(hms_tasks.__file__) + os.sep
_DEMO = (_HMS_TASKS + "demo" + os.sep,
         os.path.realpath(_HMS_TASKS) + os.sep + "demo" + os.sep)
_EXCLUDED = _excluded_roots()


@lru_cache(maxsize=4096)
def _hms_path(filename: str) -> str | None:
    """``filename`` relative to its sys.path entry if it is HMS code, else None."""
    if filename.startswith("<") or "site-packages" in filename or "dist-packages" in filename:
        return None
    if not filename.startswith(_DEMO) and filename.startswith(_EXCLUDED):
        return None
    real = os.path.realpath(filename)
    if not real.startswith(_DEMO) and real.startswith(_EXCLUDED):
        return None
    for entry in sorted((p for p in sys.path if p), key=len, reverse=True):
        base = os.path.abspath(entry).rstrip(os.sep) + os.sep
        if filename.startswith(base):
            return filename[len(base):]
    return os.path.basename(filename)


def call_site(frame: FrameType | None = None) -> str:
    """``path:line`` of the innermost HMS frame calling into here (or ``?``)."""
    f = frame if frame is not None else inspect.currentframe()
    depth = 0
    while f is not None and depth < 200:
        path = _hms_path(f.f_code.co_filename)
        if path is not None:
            return f"{path}:{f.f_lineno}"
        f = f.f_back
        depth += 1
    return UNKNOWN_SITE
