"""JSON-constrained decoding over llguidance: one grammar-side view of the tokenizer per
engine (built on first use, ~1 s), one :class:`Constraint` (an ``LLMatcher``) per request.

Per step the decode thread asks each constrained row for its allowed-token mask, masks
only that row's logits (``sampling.select``), then feeds the sampled token back. Rows
without a constraint are never touched.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from adapterctl.errors import InvalidArgument
from adapterctl.server.types import ResponseFormat

# Compact JSON: no free whitespace between tokens, so a small model cannot loop on blanks.
_JSON_OPTIONS = {"whitespace_flexible": False}


class Constraint:
    """One request's grammar state. Decode thread only."""

    def __init__(self, matcher: Any, vocab: int) -> None:
        self._matcher = matcher
        self._vocab = vocab

    def mask(self) -> torch.Tensor:
        """Bool ``[vocab]``: the tokens the grammar allows next (EOS once the JSON is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self._vocab].astype(bool))

    def accept(self, token: int) -> None:
        self._matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar admits nothing more (complete, or in error)."""
        return self._matcher.is_stopped() or self._matcher.is_error()


class Grammars:
    """Compiles response formats into constraints for one tokenizer and logits width."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._hf = tokenizer
        self._vocab = vocab_size
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab)
                except ValueError as exc:  # e.g. a slow (non-Rust) tokenizer
                    raise InvalidArgument(f"response_format is not available for this tokenizer: {exc}") from exc
            return self._tokenizer

    def constraint(self, fmt: ResponseFormat) -> Constraint:
        """A fresh constraint for ``fmt`` (json_object or json_schema); InvalidArgument with
        the grammar engine's message (naming the unsupported part) when it cannot compile."""
        from llguidance import LLMatcher

        schema = fmt.schema if fmt.type == "json_schema" else {"type": "object"}
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
        except ValueError as exc:
            raise InvalidArgument(f"response_format json_schema: {exc}") from exc
        tokenizer = self._ll_tokenizer()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise InvalidArgument(f"response_format json_schema is not supported: {'; '.join(messages)}")
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"response_format json_schema is not supported: {matcher.get_error()}")
        return Constraint(matcher, self._vocab)
