"""Aliases (promote / rollback with compare-and-swap) and delete; both backends."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from registry_testkit import PauseAfterAliasRead

from adapterctl.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from adapterctl.registry import Registry


@pytest.fixture
def three_versions(registry, adapter_dir):
    for _ in range(3):
        registry.publish(adapter_dir, "reviews")
    return registry


def test_promote_resolve_and_rollback(three_versions):
    reg = three_versions
    assert reg.promote("reviews", 1, "prod") is None
    assert reg.resolve("reviews:prod").version == 1
    assert reg.promote("reviews", 3, "prod") == 1
    assert reg.promote("reviews", 2, "prod") == 3
    reg.promote("reviews", 1, "staging")
    assert reg.aliases("reviews") == {"prod": 2, "staging": 1}
    assert reg.rollback("reviews", "prod") == 3
    assert reg.resolve("reviews:prod").version == 3
    assert reg.rollback("reviews", "prod") == 1
    with pytest.raises(FailedPrecondition, match="no earlier target"):
        reg.rollback("reviews", "prod")
    assert reg.resolve("reviews:prod").version == 1


def test_promote_refusals(three_versions):
    reg = three_versions
    with pytest.raises(NotFound, match="reviews:9"):
        reg.promote("reviews", 9, "prod")
    with pytest.raises(InvalidArgument, match="latest"):
        reg.promote("reviews", 1, "latest")
    with pytest.raises(InvalidArgument, match="invalid alias"):
        reg.promote("reviews", 1, "../prod")
    with pytest.raises(NotFound, match="alias 'prod'"):
        reg.rollback("reviews", "prod")


def test_concurrent_promote_one_wins_the_other_gets_conflict(three_versions):
    three_versions.promote("reviews", 1, "prod")
    racing = Registry(PauseAfterAliasRead(three_versions.store, parties=2))

    def promote(version):
        try:
            racing.promote("reviews", version, "prod")
            return ("won", version)
        except Conflict as exc:
            return ("conflict", str(exc))

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(promote, [2, 3]))
    assert [kind for kind, _ in outcomes] == ["conflict", "won"]
    assert "moved by someone else" in outcomes[0][1]
    winner = outcomes[1][1]
    assert three_versions.resolve("reviews:prod").version == winner
    assert three_versions.rollback("reviews", "prod") == 1  # the loser left no trace in the history


def test_many_concurrent_promotions_lose_no_update(registry, adapter_dir):
    for _ in range(8):
        registry.publish(adapter_dir, "reviews")

    def promote(version):
        try:
            return version, registry.promote("reviews", version, "prod")
        except Conflict:
            return None

    with ThreadPoolExecutor(8) as pool:
        wins = [r for r in pool.map(promote, range(1, 9)) if r is not None]
    assert wins, "at least one promotion must win"
    state = registry._aliases.read("reviews", "prod")
    # Every successful promotion is in the alias's chain exactly once, and each
    # replaced exactly the target it reported.
    chain = [*state.history, state.version]
    assert sorted(chain) == sorted(v for v, _ in wins)
    assert {v: prev for v, prev in wins} == dict(zip(chain, [None, *chain[:-1]]))


def test_delete_is_refused_while_an_alias_points_at_the_version(three_versions):
    reg = three_versions
    reg.promote("reviews", 2, "prod")
    with pytest.raises(FailedPrecondition, match="target of alias prod"):
        reg.delete("reviews", 2)
    assert reg.resolve("reviews:2").version == 2
    reg.delete("reviews", 2, force=True)
    with pytest.raises(NotFound, match="reviews:2 was deleted"):
        reg.resolve("reviews:2")
    with pytest.raises(NotFound, match="reviews:prod -> reviews:2 was deleted"):
        reg.resolve("reviews:prod")
    with pytest.raises(NotFound, match="already deleted"):
        reg.delete("reviews", 2)


def test_deleted_numbers_are_never_reused(three_versions, adapter_dir):
    reg = three_versions
    deleted = reg.resolve("reviews:3")
    reg.delete("reviews", 3)
    assert [m.version for m in reg.list_versions("reviews")] == [1, 2]
    assert reg.resolve("reviews").version == 2
    with pytest.raises(NotFound):
        reg.resolve(f"reviews@{deleted.digest}")
    assert reg.publish(adapter_dir, "reviews").version == 4


def test_rollback_skips_versions_deleted_since(three_versions):
    reg = three_versions
    for version in (1, 2, 3):
        reg.promote("reviews", version, "prod")
    reg.delete("reviews", 2)
    assert reg.rollback("reviews", "prod") == 1
