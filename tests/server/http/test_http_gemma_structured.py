"""Structured output on the real Gemma 3 270M (slow): 20 schema-constrained chat requests
(nested objects, enums, arrays) all parse and validate, and the unconstrained requests
batched with them keep exactly their greedy output; json_object gives a JSON object."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from .conftest import base_url

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genre": {"enum": ["action", "comedy", "drama", "horror", "sci-fi"]},
        "cast": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30},
            "role": {"enum": ["lead", "support"]}}, "required": ["name", "role"], "additionalProperties": False},
            "minItems": 1, "maxItems": 3},
        "review": {"type": "object", "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
            "required": ["score", "tags"], "additionalProperties": False},
    },
    "required": ["title", "year", "genre", "cast", "review"],
    "additionalProperties": False,
}
FILMS = ["Jaws", "Alien", "Heat", "Up", "Psycho", "Rocky", "Brazil", "Fargo", "Coco", "Se7en",
         "Big", "Ran", "Nope", "Tron", "Her", "Elf", "Ghost", "Speed", "Clue", "Signs"]


def test_gemma_json_schema_in_mixed_batches(make_server, gemma_base, tmp_path):
    bg = make_server(base_model=str(gemma_base.path), uri=f"file://{tmp_path / 'registry'}",
                     max_running_requests=24, max_new_tokens_limit=256, max_prompt_tokens=256,
                     dtype="float32")  # exact greedy equality across batch shapes is an fp32 property: auto
    # picks bf16 on AVX512-BF16/AMX hosts, where a row's rounding depends on the batch's GEMM shape
    model = bg.server.engine.base.id
    with openai.OpenAI(base_url=base_url(bg), api_key="x", max_retries=0, timeout=900) as client:
        def plain(prompt: str) -> str:
            return client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                             extra_headers={"x-request-id": "plain"}).choices[0].text

        def constrained(film: str) -> str:
            resp = client.chat.completions.create(
                model=model, max_tokens=200, temperature=0, extra_headers={"x-request-id": f"json-{film}"},
                messages=[{"role": "user", "content": f"Describe the film {film} as JSON with title, year, genre, "
                                                      "cast and review."}],
                response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}})
            assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
            return resp.choices[0].message.content

        neighbours = ["The best thing about summer is", "My favourite film is", "In 1999 the internet",
                      "A good cup of tea needs"]
        alone = [plain(p) for p in neighbours]
        steps: list[set[str]] = []
        bg.server.engine.logits_hook = lambda seqs, logits: steps.append({s.request.request_id[:4] for s in seqs})
        with ThreadPoolExecutor(24) as pool:
            jobs = [pool.submit(constrained, f) for f in FILMS]
            mixed = [pool.submit(plain, p) for p in neighbours]
            outputs = [j.result(timeout=1800) for j in jobs]
            assert [m.result(timeout=1800) for m in mixed] == alone
        bg.server.engine.logits_hook = None
        assert any({"json", "plai"} <= s for s in steps)  # constrained and free rows shared engine steps
        for text in outputs:
            jsonschema.validate(json.loads(text), SCHEMA)
        obj = client.chat.completions.create(
            model=model, max_tokens=160, temperature=0, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Give a JSON object with the keys city and country for Paris."}]
        ).choices[0]
        assert obj.finish_reason == "stop" and isinstance(json.loads(obj.message.content), dict), obj.message.content
