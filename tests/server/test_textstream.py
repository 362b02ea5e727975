"""StopTextStream's windowed decoding against the real Gemma 3 tokenizer: pushing tokens one at
a time (or several) gives, at every step, the text of decoding every id so far, so the deltas add
up to the whole decode: words with leading spaces, multi-byte characters split over byte tokens,
special tokens skipped, and random ids."""
from __future__ import annotations

import random

import pytest

from adapterctl.server.textstream import _REPLACEMENT, StopTextStream


@pytest.fixture(scope="module")
def tok(gemma_base):
    from adapterctl.basemodel import load_tokenizer

    return load_tokenizer(gemma_base)


def _sequences(tok):
    text = "Hello  world, naïve café: 3.14 ≠ π; 日本語のテキスト 🙂🙃 end.\n\ttabs  and\nnew lines"
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    yield ids
    yield [tok.bos_token_id, *ids[:10], tok.eos_token_id, *ids[10:]]  # special tokens inside
    for _ in range(20):
        yield [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
    # byte-fallback tokens of multi-byte characters one at a time
    yield tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in "€ 日本 🙂".encode()])


@pytest.mark.parametrize("step", [1, 3])
def test_each_push_sees_the_decode_of_every_id_so_far(tok, step):
    for ids in _sequences(tok):
        s = StopTextStream(tok)
        deltas = []
        for i in range(0, len(ids), step):
            deltas.append(s.push(ids[i:i + step]))
            want = tok.decode(ids[:i + step], skip_special_tokens=True)
            assert s.text == want, (ids, i)
        deltas.append(s.finish())
        whole = tok.decode(ids, skip_special_tokens=True)
        whole = whole.rstrip(_REPLACEMENT) if whole.endswith(_REPLACEMENT) else whole
        assert "".join(deltas) == whole and s.text == whole
