"""Cache tags: ``<kind>:<id>`` strings naming what a cached value depends on.

``patient:42`` is patient 42's row and everything about them; ``practitioner:7`` a
practitioner's appointments; ``department:3`` a department's encounters. The tag ``all``
stands for the whole cache: every tagged value depends on it, so invalidating it empties the
cache at once (used when invalidations could not be tracked one by one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hms_tasks.errors import InvalidArguments

__all__ = ["ALL", "MAX_TAGS", "TAG_RE", "check_tags"]

ALL = "all"
TAG_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}:[A-Za-z0-9_.:-]{1,64}$")
#: Most tags one call may name (a bulk change names at most this many at a time).
MAX_TAGS = 10_000


def check_tags(tags: Iterable[str], *, argument: str = "tags") -> list[str]:
    """Deduplicated, validated tags; raises :class:`InvalidArguments` naming ``argument``.

    A tag is ``<kind>:<id>`` (kind: lower-case letters, digits, ``_``; id: letters, digits,
    ``_ . : -``), or ``all``. The message never quotes a tag: a malformed one may be data.
    """
    if isinstance(tags, (str, bytes)):
        raise InvalidArguments("cache", [f"{argument}: expected a list of tags, got a string"])
    out: dict[str, None] = {}
    for tag in tags:
        if not isinstance(tag, str) or not (tag == ALL or TAG_RE.match(tag)):
            raise InvalidArguments("cache", [
                f"{argument}: every tag must look like 'kind:id' (for example 'patient:42') "
                "or be 'all'"])
        out[tag] = None
        if len(out) > MAX_TAGS:
            raise InvalidArguments("cache", [f"{argument}: at most {MAX_TAGS} tags per call"])
    return list(out)
