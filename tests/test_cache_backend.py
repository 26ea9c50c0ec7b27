"""The tag-aware cache backend against a real Redis: Django's API, tags, generations,
encryption."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.cache import caches
from django.test import override_settings

from hms_tasks.cache.backend import TaggedRedisCache
from hms_tasks.cache.core import backend
from hms_tasks.errors import ConfigurationError, InvalidArguments


def fresh() -> TaggedRedisCache:
    """A new backend object (settings such as keys are read when one is made)."""
    from django.conf import settings as dj

    params = dict(dj.CACHES["hms"])
    return TaggedRedisCache(params.pop("LOCATION"), params)


def test_django_cache_api_behaves_as_documented() -> None:
    c = backend()
    assert c is caches["hms"]
    c.set("plain", {"a": 1}, 30)
    assert c.get("plain") == {"a": 1}
    assert c.get("absent", "dflt") == "dflt"
    assert c.add("plain", {"a": 2}) is False
    assert c.add("other", [1, 2]) is True
    assert c.get_many(["plain", "other", "absent"]) == {"plain": {"a": 1}, "other": [1, 2]}
    c.set("n", 5)
    assert c.incr("n", 3) == 8
    assert c.has_key("plain")
    assert c.delete("plain") is True
    assert not c.has_key("plain")
    c.set_many({"x": "1", "y": 2})
    assert c.get_many(["x", "y"]) == {"x": "1", "y": 2}
    assert c.touch("x", 10) is True


def test_tagged_values_die_with_their_tags() -> None:
    c = backend()
    assert c.set("p1", {"id": 1}, 60, tags=["patient:1"]) is True
    assert c.set("p2", {"id": 2}, 60, tags=["patient:2", "department:9"]) is True
    c.set("untagged", {"id": 3}, 60)
    assert c.get("p1") == {"id": 1}
    unlinked, hot = c.invalidate_tags(["patient:1", "department:9"])
    assert unlinked == 2
    assert hot == []
    assert c.get("p1") is None
    assert c.get("p2") is None
    assert not c.has_key("p2")
    assert c.get("untagged") == {"id": 3}
    # The keys are gone from Redis, not merely refused.
    assert c.client().exists(c.make_key("p1"), c.make_key("p2")) == 0


def test_conditional_set_refuses_a_value_read_before_an_invalidation() -> None:
    c = backend()
    gens = c.generations(["patient:5"])  # taken before "reading the database"
    c.invalidate_tags(["patient:5"])     # a writer commits and invalidates meanwhile
    assert c.set("p5", {"v": "old"}, 60, tags=["patient:5"], generations=gens) is False
    assert c.get("p5") is None
    assert c.set("p5", {"v": "new"}, 60, tags=["patient:5"],
                  generations=c.generations(["patient:5"])) is True
    assert c.get("p5") == {"v": "new"}


def test_fill_many_stores_the_current_and_refuses_the_stale() -> None:
    c = backend()
    tags = {n: ["all", f"patient:{n}", "department:3"] for n in (11, 12, 13)}
    gens = {n: c.generations(t[1:]) for n, t in tags.items()}  # [all, patient, department]
    c.invalidate_tags(["patient:12"])  # 12 changed after its generations were read
    stored = c.fill_many([(c.make_key(f"p{n}"), {"id": n}, tags[n], gens[n]) for n in tags],
                         timeout=60)
    assert stored == 2
    assert c.get_many(["p11", "p12", "p13"]) == {"p11": {"id": 11}, "p13": {"id": 13}}
    client = c.client()
    # Indexed under each tag (so invalidation unlinks them), never under "all".
    assert client.smembers(c.index_prefix + "department:3") == {
        c.make_key("p11").encode(), c.make_key("p13").encode()}
    assert not client.exists(c.index_prefix + "all")
    assert 0 < client.ttl(c.index_prefix + "patient:11") <= c.index_ttl(60)
    assert c.invalidate_tags(["department:3"])[0] == 2
    assert c.get_many(["p11", "p13"]) == {}


def test_value_survives_losing_its_tag_index_but_not_its_generation() -> None:
    c = backend()
    c.set("p6", {"id": 6}, 60, tags=["patient:6"])
    client = c.client()
    client.delete(c.index_prefix + "patient:6")  # an evicted index: invalidation can't unlink
    c.invalidate_tags(["patient:6"])
    assert c.get("p6") is None  # dead by generation anyway
    c.set("p7", {"id": 7}, 60, tags=["patient:7"])
    client.delete(c.gen_prefix + "patient:7")  # an evicted generation: a miss, never stale
    assert c.get("p7") is None


def test_invalidating_all_kills_every_tagged_value() -> None:
    c = backend()
    c.set("a", 1, 60, tags=["patient:1"])
    c.set("b", {"b": 1}, 60, tags=["practitioner:2"])
    c.invalidate_tags(["all"])
    assert c.get_many(["a", "b"]) == {}


@pytest.mark.parametrize("tags", [["Patient:1"], ["patient"], ["patient:1 2"], "patient:1",
                                  [1], ["a:" + "x" * 65]])
def test_malformed_tags_are_refused_without_writing(tags: Any) -> None:
    c = backend()
    with pytest.raises(InvalidArguments) as info:
        c.set("t", 1, 60, tags=tags)
    assert "tags:" in str(info.value)
    assert c.get("t") is None


def test_encryption_round_trip_rotation_and_tamper(caplog: pytest.LogCaptureFixture) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(HMS_TASKS_CACHE_ENCRYPTION_KEYS=[old]):
        c = fresh()
        c.set("secret", {"name": "Jane Doe"}, 60, tags=["patient:8"])
        raw = c.client().get(c.make_key("secret"))
        assert b"Jane" not in raw
        assert c.get("secret") == {"name": "Jane Doe"}
    with override_settings(HMS_TASKS_CACHE_ENCRYPTION_KEYS=[new, old]):
        c = fresh()
        assert c.get("secret") == {"name": "Jane Doe"}  # old key still decrypts
        c.set("secret2", {"name": "John Roe"}, 60)
    with override_settings(HMS_TASKS_CACHE_ENCRYPTION_KEYS=[new]):
        c = fresh()
        assert c.get("secret2") == {"name": "John Roe"}
        assert c.get("secret") is None  # only the retired key could read it
        key = c.make_key("secret2")
        token = c.client().get(key)
        c.client().set(key, token[:-3] + (b"AAA" if not token.endswith(b"AAA") else b"BBB"))
        with caplog.at_level("WARNING"):
            assert c.get("secret2") is None  # tampered: a miss
        assert "John" not in caplog.text
        assert "failed decryption" in caplog.text
    # Without keys, an encrypted value is unreadable, not served as garbage.
    c = fresh()
    assert c.get("secret2") is None


def test_bad_encryption_key_is_a_startup_error_naming_the_setting() -> None:
    with override_settings(HMS_TASKS_CACHE_ENCRYPTION_KEYS=["not-a-key"]), \
            pytest.raises(ConfigurationError) as info:
        fresh()
    assert "HMS_TASKS_CACHE_ENCRYPTION_KEYS[0]" in str(info.value)
    assert "not-a-key" not in str(info.value)
