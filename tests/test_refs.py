"""adapterctl.refs: the one reference parser and name validator every layer uses."""
from __future__ import annotations

import pytest

from adapterctl.errors import InvalidArgument
from adapterctl.refs import AdapterRef, parse_ref, validate_alias, validate_name

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("text, expected", [
    ("reviews", AdapterRef("reviews")),
    ("reviews:latest", AdapterRef("reviews")),
    ("reviews:3", AdapterRef("reviews", version=3)),
    ("reviews:007", AdapterRef("reviews", version=7)),
    ("reviews:prod", AdapterRef("reviews", alias="prod")),
    ("reviews:canary-2", AdapterRef("reviews", alias="canary-2")),
    (f"reviews@{DIGEST}", AdapterRef("reviews", digest=DIGEST)),
    ("  my.adapter_v2-x ", AdapterRef("my.adapter_v2-x")),
    ("A" * 128, AdapterRef("A" * 128)),
])
def test_parse_valid_references(text, expected):
    assert parse_ref(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "must not be empty"),
    ("   ", "must not be empty"),
    ("reviews:", "nothing after ':'"),
    ("reviews:0", "versions start at 1"),
    ("reviews:-1", "invalid alias"),
    ("reviews:1a", "invalid alias"),
    ("reviews:pr/od", "invalid alias"),
    ("reviews@sha256:abc", "expected sha256:<64 lowercase hex>"),
    ("reviews@" + DIGEST.upper(), "invalid digest"),
    ("reviews@md5:" + "0" * 64, "invalid digest"),
    ("reviews:pr\x00od", "invalid alias"),
    ("../etc:1", "invalid adapter name"),
    ("a/b", "invalid adapter name"),
    ("a..b", "without '..'"),
    (".hidden", "invalid adapter name"),
    ("_x", "invalid adapter name"),
    ("A" * 129, "longer than 128"),
    (":1", "must not be empty"),
    ("@" + DIGEST, "must not be empty"),
])
def test_bad_references_get_one_clear_line(text, fragment):
    with pytest.raises(InvalidArgument) as info:
        parse_ref(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("ref", ["reviews", "reviews:3", "reviews:prod", f"reviews@{DIGEST}"])
def test_str_round_trips(ref):
    assert str(parse_ref(ref)) == ref


def test_latest_is_implicit():
    assert parse_ref("x").is_latest and parse_ref("x:latest").is_latest
    assert not parse_ref("x:1").is_latest and not parse_ref("x:prod").is_latest
    assert not parse_ref(f"x@{DIGEST}").is_latest


def test_validators_used_for_storage_keys():
    from adapterctl.refs import validate_digest

    with pytest.raises(InvalidArgument):
        validate_digest(DIGEST + "\n")
    assert validate_name("ok-name.1") == "ok-name.1"
    assert validate_alias("prod") == "prod"
    for bad in ("", "a b", "a/b", "..", "x\n"):
        with pytest.raises(InvalidArgument):
            validate_name(bad)
    for bad in ("1prod", "", "a" * 65, "pr.od", "prod\n"):
        with pytest.raises(InvalidArgument):
            validate_alias(bad)
    with pytest.raises(InvalidArgument, match="alias name"):
        validate_name("", what="alias name")
