"""One streaming test on the real Gemma 3 270M (issue 5): chat messages through Gemma's
chat template, chunks in order, one final message, equal to the unary answer."""
from __future__ import annotations

import pytest

from adapterctl.client import Client

pytestmark = pytest.mark.slow


def test_gemma_chat_stream(make_server, gemma_base, tmp_path):
    bg = make_server(base_model=str(gemma_base.path), uri=f"file://{tmp_path / 'registry'}",
                     max_running_requests=1, max_new_tokens_limit=64, default_max_new_tokens=32,
                     max_prompt_tokens=128)
    turns = [{"role": "user", "content": "Write one witty sentence about a heist movie."}]
    with Client(bg.address, timeout=300) as c:
        stream = c.generate_stream(messages=turns, max_new_tokens=12)
        chunks = list(stream)
        final = stream.result
        unary = c.chat(turns, max_new_tokens=12)
    assert final is not None and final.adapter is None
    assert len(chunks) >= 2 and "".join(ch.text for ch in chunks) == final.text
    assert [t for ch in chunks for t in ch.token_ids] == list(final.token_ids)
    assert final.finish_reason in ("length", "eos") and final.text.strip()
    assert unary.token_ids == final.token_ids  # greedy: streaming and unary agree
    if final.finish_reason == "eos":
        assert final.token_ids[-1] in (1, 106)  # <eos> or <end_of_turn>
