"""OpenAI response objects built from engine results: completions, chat completions,
their stream chunks, usage and the two logprob layouts (completions: parallel lists;
chat: ``content`` entries with token bytes)."""
from __future__ import annotations

import math
from typing import Any

from adapterctl.server.generation import token_text
from adapterctl.server.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationResult,
    TokenLogprob,
)

FINISH = {FINISH_EOS: "stop", FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_CANCELLED: "abort"}
_FLOOR = -9999.0  # OpenAI's stand-in for log(0): JSON has no -inf


def _lp(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


def usage(results: list[GenerationResult], prompt_tokens: int) -> dict[str, int]:
    """Usage of a request: ``prompt_tokens`` counted once per distinct prompt by the caller."""
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """``{tokens, token_logprobs, top_logprobs, text_offset}``; ``offset`` = characters before these tokens."""
    if logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(_lp(lp.logprob))
        tops.append({token_text(tokenizer, t): _lp(v) for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _entry(tokenizer: Any, token_id: int, value: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": _lp(value), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None) -> dict | None:
    """``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    if logprobs is None:
        return None
    return {"content": [{**_entry(tokenizer, lp.token_id, lp.logprob),
                         "top_logprobs": [_entry(tokenizer, t, v) for t, v in lp.top]} for lp in logprobs],
            "refusal": None}


def envelope(kind: str, request_id: str, created: int, model: str, fingerprint: str) -> dict[str, Any]:
    """The fields every response and chunk of one request share."""
    prefix = "chatcmpl-" if kind.startswith("chat") else "cmpl-"
    return {"id": prefix + request_id, "object": kind, "created": created, "model": model,
            "system_fingerprint": fingerprint}


def completion_choice(index: int, result: GenerationResult, tokenizer: Any) -> dict[str, Any]:
    return {"index": index, "text": result.text, "logprobs": completion_logprobs(tokenizer, result.logprobs),
            "finish_reason": FINISH.get(result.finish_reason, "stop")}


def chat_choice(index: int, result: GenerationResult, tokenizer: Any) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": chat_logprobs(tokenizer, result.logprobs),
            "finish_reason": FINISH.get(result.finish_reason, "stop")}
