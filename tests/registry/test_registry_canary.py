"""Weighted aliases (a primary plus one canary), the v1 alias reader, labels set after
publish, and the canary-vs-promote race; both backends (local and moto over HTTP)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from registry_testkit import PauseAfterAliasRead

from adapterctl.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from adapterctl.registry import Registry, layout


def v1_alias_reader(raw: bytes) -> tuple[int, list[int]]:
    """The alias parsing of adapterctl before weighted aliases (registry/aliases.py at
    555e302, ``Aliases.read``), kept verbatim: what an old server or CLI still runs."""
    data = json.loads(raw)
    return int(data["version"]), [int(v) for v in data.get("history", [])]


@pytest.fixture
def four_versions(registry, adapter_dir):
    for _ in range(4):
        registry.publish(adapter_dir, "reviews")
    registry.promote("reviews", 1, "prod")
    registry.promote("reviews", 3, "prod")
    return registry


def test_canary_keeps_the_primary_and_adds_a_weighted_version(four_versions):
    reg = four_versions
    assert reg.promote("reviews", 4, "prod", canary=10) == 3
    state = reg.alias_states("reviews")["prod"]
    assert (state.version, state.canary.version, state.canary.weight) == (3, 4, 10.0)
    assert state.versions() == {3: 90.0, 4: 10.0}
    assert reg.aliases("reviews") == {"prod": 3}  # the old API still answers the primary
    assert reg.resolve("reviews:prod").version == 3
    route = reg.resolve_route("reviews:prod")
    assert (route.primary.version, route.canary.version, route.weight) == (3, 4, 10.0)
    assert reg.resolve_route("reviews:2").canary is None
    # Re-weighting replaces the canary; the history of primaries is untouched.
    reg.promote("reviews", 4, "prod", canary=25.5)
    state = reg.alias_states("reviews")["prod"]
    assert state.canary.weight == 25.5 and state.history == [1]
    assert [c["action"] for c in state.changes] == ["promote", "promote", "canary", "canary"]


def test_promote_without_canary_moves_all_traffic_and_rollback_drops_a_canary_first(four_versions):
    reg = four_versions
    reg.promote("reviews", 4, "prod", canary=10)
    assert reg.rollback("reviews", "prod") == 3  # drops the canary only
    state = reg.alias_states("reviews")["prod"]
    assert (state.version, state.canary, state.history) == (3, None, [1])
    reg.promote("reviews", 4, "prod", canary=10)
    assert reg.promote("reviews", 4, "prod") == 3  # the canary becomes the primary
    state = reg.alias_states("reviews")["prod"]
    assert (state.version, state.canary, state.history) == (4, None, [1, 3])
    assert reg.rollback("reviews", "prod") == 3  # no canary: back to the previous primary
    reg.promote("reviews", 2, "prod", canary=50)
    assert reg.promote("reviews", 3, "prod") == 3  # promoting the primary drops the canary
    assert reg.alias_states("reviews")["prod"].canary is None


def test_canary_refusals(four_versions):
    reg = four_versions
    for weight in (0, 100, -1, 150, float("nan")):
        with pytest.raises(InvalidArgument, match=r"percentage in \(0, 100\)"):
            reg.promote("reviews", 4, "prod", canary=weight)
    with pytest.raises(InvalidArgument, match="already the primary"):
        reg.promote("reviews", 3, "prod", canary=10)
    with pytest.raises(FailedPrecondition, match="promote a primary first"):
        reg.promote("reviews", 4, "staging", canary=10)
    with pytest.raises(NotFound, match="reviews:9"):
        reg.promote("reviews", 9, "prod", canary=10)
    reg.promote("reviews", 4, "prod", canary=10)
    with pytest.raises(FailedPrecondition, match="target of alias prod"):
        reg.delete("reviews", 4)  # the canary is a target too
    reg.delete("reviews", 4, force=True)  # then the primary keeps all traffic
    route = reg.resolve_route("reviews:prod")
    assert (route.primary.version, route.canary, route.weight) == (3, None, 0.0)


def test_an_old_reader_reads_the_primary_of_a_weighted_alias(four_versions):
    reg = four_versions
    reg.promote("reviews", 4, "prod", canary=10)
    raw, _ = reg.store.get(layout.alias_key("reviews", "prod"))
    assert json.loads(raw)["format"] == "adapterctl.alias/v2"
    assert v1_alias_reader(raw) == (3, [1])


def test_a_v1_alias_document_is_read_and_upgraded_on_the_next_change(four_versions):
    reg = four_versions
    key = layout.alias_key("reviews", "prod")
    _, etag = reg.store.get(key)
    v1 = {"format": "adapterctl.alias/v1", "name": "reviews", "alias": "prod", "version": 2, "history": [1],
          "updated": "2026-01-01T00:00:00.000+00:00", "updated_by": "old@host"}
    reg.store.put_if_match(key, json.dumps(v1).encode(), etag)
    assert reg.resolve("reviews:prod").version == 2
    assert reg.alias_states("reviews")["prod"].canary is None
    reg.promote("reviews", 4, "prod", canary=5)
    raw, _ = reg.store.get(key)
    assert v1_alias_reader(raw) == (2, [1])
    assert reg.rollback("reviews", "prod") == 2 and reg.rollback("reviews", "prod") == 1


@pytest.mark.parametrize("canary_first", [True, False])
def test_racing_canary_and_promote_exactly_one_wins(four_versions, canary_first):
    """Both read the same alias document, then write: one compare-and-swap wins, the
    other gets Conflict, and the stored document is exactly the winner's."""
    racing = Registry(PauseAfterAliasRead(four_versions.store, parties=2))

    def change(kind):
        try:
            if kind == "canary":
                racing.promote("reviews", 4, "prod", canary=10)
            else:
                racing.promote("reviews", 2, "prod")
            return (kind, "won")
        except Conflict as exc:
            assert "moved by someone else" in str(exc)
            return (kind, "conflict")

    kinds = ["canary", "promote"] if canary_first else ["promote", "canary"]
    with ThreadPoolExecutor(2) as pool:
        outcomes = dict(pool.map(change, kinds))
    assert sorted(outcomes.values()) == ["conflict", "won"], outcomes
    state = four_versions.alias_states("reviews")["prod"]
    if outcomes["canary"] == "won":
        assert (state.version, state.canary.version, state.history) == (3, 4, [1])
    else:
        assert (state.version, state.canary, state.history) == (2, None, [1, 3])


def test_labels_are_writable_after_publish_and_the_manifest_stays_immutable(registry, adapter_dir):
    m = registry.publish(adapter_dir, "reviews", labels={"team": "nlp"})
    raw_before, _ = registry.store.get(layout.version_key("reviews", 1))
    assert registry.set_labels("reviews", 1, {"eval.loss": "1.25"}) == {"team": "nlp", "eval.loss": "1.25"}
    assert registry.set_labels("reviews", 1, {"eval.loss": "1.20", "x": "y"}, remove=("x",)) == {
        "team": "nlp", "eval.loss": "1.20"}
    assert registry.labels("reviews:1") == {"team": "nlp", "eval.loss": "1.20"}
    assert registry.store.get(layout.version_key("reviews", 1))[0] == raw_before
    assert registry.resolve(f"reviews@{m.digest}").labels == {"team": "nlp"}
    with pytest.raises(InvalidArgument, match="invalid label key"):
        registry.set_labels("reviews", 1, {"bad key": "v"})
    with pytest.raises(NotFound):
        registry.set_labels("reviews", 7, {"a": "b"})


def test_concurrent_label_writers_lose_no_key(registry, adapter_dir):
    registry.publish(adapter_dir, "reviews")
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: registry.set_labels("reviews", 1, {f"k{i}": str(i)}), range(6)))
    assert registry.labels("reviews:1") == {f"k{i}": str(i) for i in range(6)}
