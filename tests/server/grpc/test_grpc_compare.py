"""Side-by-side comparison: ``Client.compare`` and ``adapterctl generate`` with several
``--adapter``s send the same request to each reference concurrently."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adapterctl.client.cli.main import cli
from adapterctl.errors import InvalidArgument, NotFound

REFS = ["alpha:1", "alpha:2", "beta", ""]


@pytest.fixture(scope="module")
def roomy(published, start_batched):
    return start_batched(published[0])


@pytest.fixture
def client(roomy):
    from adapterctl.client import Client

    with Client(roomy.address, timeout=120) as c:
        yield c


def test_compare_returns_each_reference_in_order_and_matches_single_requests(client):
    results = client.compare("Once upon a time", adapters=REFS, max_new_tokens=6)
    served = [(r.adapter.name, r.adapter.version) if r.adapter else None for r in results]
    assert served == [("alpha", 1), ("alpha", 2), ("beta", 1), None]
    singles = [client.generate("Once upon a time", adapter=ref, max_new_tokens=6).token_ids for ref in REFS]
    assert [r.token_ids for r in results] == singles
    assert len({r.token_ids for r in results}) > 1  # the adapters really differ
    with pytest.raises(NotFound):
        client.compare("hi", adapters=["alpha:1", "nosuch"], max_new_tokens=1)
    with pytest.raises(InvalidArgument):
        client.compare("hi", adapters=[])


def test_generate_with_several_adapters_prints_a_table_or_json(roomy, client):
    args = ["generate", "--server", roomy.address, "-n", "4", "--adapter", "alpha:1", "--adapter", "beta",
            "--adapter", "", "Once upon a time"]
    rows = [json.loads(line) for line in CliRunner().invoke(cli, [*args, "--json"]).output.splitlines()]
    assert [r["ref"] for r in rows] == ["alpha:1", "beta", ""]
    assert [r["adapter"]["name"] if r["adapter"] else None for r in rows] == ["alpha", "beta", None]
    expected = client.generate("Once upon a time", adapter="beta", max_new_tokens=4).text
    assert rows[1]["text"] == expected
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert "alpha:1" in table.output and "-> beta:1, 4 tokens" in table.output and "base model" in table.output
    refused = CliRunner().invoke(cli, [*args, "--stream"])
    assert refused.exit_code == 2 and "--stream takes one --adapter" in refused.output
