"""Model runner: one forward over a packed, heterogeneous batch of sequence chunks,
using the HF model's own modules (embeddings, norms, projections, MLP, LM head) with
a KV cache it manages per sequence and LoRA-aware linears.

Supported decoder families share the pre-norm attention/MLP layout: ``gemma3_text``
(sandwich norms, q/k norms, per-layer-type RoPE, sliding windows), ``llama``,
``mistral``, ``qwen2`` and ``qwen3``. Any other model type is refused with
FailedPrecondition naming it.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adapterctl.errors import FailedPrecondition
from adapterctl.server.engine import amx_head, cpu_fused, kernels, pages
from adapterctl.server.engine.batch import LoraBatch, current_batch, use_batch
from adapterctl.server.engine.config import LORA_MODULE_TYPES
from adapterctl.server.engine.decode_layer import PlannedLayers
from adapterctl.server.engine.greedy_head import GreedyHead
from adapterctl.server.engine.kernels import pick_gemm
from adapterctl.server.engine.kv import KVCache
from adapterctl.server.engine.lora import LoraLinear, make_backend
from adapterctl.server.engine.norms import FusedRMSNorm, fuse_norms
from adapterctl.server.engine.packed import PackedLinear
from adapterctl.server.engine.sampling import first_max, merge_max
from adapterctl.server.engine.slots import SlotBank

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")


@dataclass
class Chunk:
    """One sequence's tokens in a step: positions ``start_pos .. start_pos+len(tokens)-1``."""

    row: int  # KV row of the sequence
    start_pos: int
    tokens: list[int]  # [n] token ids
    slot: int  # LoRA slot, 0 = base model
    sample: bool  # return logits for the last token
    argmax_only: bool = False  # only the argmax of those logits is read (greedy, no logprobs, no grammar)


class ModelRunner:
    """Wraps ``model`` (an HF ``*ForCausalLM``) in place: its target linears become
    :class:`LoraLinear` backed by ``self.bank``; ``forward`` reads and writes ``self.kv``."""

    def __init__(self, model: nn.Module, *, max_rows: int, max_positions: int, num_slots: int, max_rank: int,
                 lora_modules: tuple[str, ...], backend: str = "auto", gemm: str = "auto", fuse: bool = True,
                 prepack: bool = True, fused_ops: bool = True, greedy_head: bool = True,
                 planned_layers: bool = True, page_rank: int | None = None) -> None:
        cfg = model.config
        model_type = getattr(cfg, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise FailedPrecondition(f"the batching engine does not support model type {model_type!r} "
                                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if getattr(cfg, "attn_logit_softcapping", None):
            raise FailedPrecondition(f"model type {model_type!r} with attention logit softcapping is not supported")
        self.model = model.eval()
        self.config = cfg
        self.inner = model.model
        self.layers = list(self.inner.layers)
        # (fused, kept): one op per norm where that is bitwise the same; ``fuse=False`` keeps the
        # HF modules and unpacked projections (the baseline of bench/step_bench.py)
        self.fused_norms = fuse_norms(model, c_kernel=fused_ops) if fuse else (0, 0)
        # norms (above) and RoPE as one bitwise C call each on CPU (cpu_fused); False: ATen's ops
        self.fused_ops = fused_ops and fuse
        # per layer, the q/k norms for cpu_fused.attention_prep (None: the model has none), or
        # False where they do not run through the C kernel (then the separate ops)
        self.qk_norms = [self._qk_norms(layer.self_attn) for layer in self.layers]
        self.sandwich = hasattr(self.layers[0], "pre_feedforward_layernorm")
        # per sandwich layer, (post-attention, pre-feedforward, post-feedforward) norms for
        # cpu_fused.residual_norm, or None where they do not run through the C kernel
        self.residual_norms = [self._residual_norms(layer) for layer in self.layers]
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.windows = [self._window(layer.self_attn, model_type) for layer in self.layers]
        self._rope_by_type = "layer_type" in inspect.signature(self.inner.rotary_emb.forward).parameters
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.backend = make_backend(backend)
        self.gemm = pick_gemm(gemm, self.device, self.dtype)
        # Every projection is wrapped (for the fast GEMM); only ``lora_modules`` get slot banks.
        wrapped = self._wrap(LORA_MODULE_TYPES)
        self.lora_modules = {p: m for p, m in wrapped.items() if p.rsplit(".", 1)[-1] in lora_modules}
        self.bank = SlotBank(self.lora_modules, num_slots, max_rank, self.device, self.dtype, page_rank)
        no_pack = [None] * len(self.layers)
        self.qkv = [self._pack(layer.self_attn, ("q_proj", "k_proj", "v_proj"), prepack) for layer in self.layers] \
            if fuse else no_pack
        self.gate_up = [self._pack(layer.mlp, ("gate_proj", "up_proj"), prepack) for layer in self.layers] if fuse \
            else no_pack
        packs = [p for p in (*self.qkv, *self.gate_up) if p is not None]
        if packs:
            log.info("packed %d projection groups into one GEMM each (%d MiB of mmapped originals released)",
                     len(packs), sum(p.released for p in packs) >> 20)
        # (lo, hi, operand) vocab slices of the LM head in the GEMM's own layout, or None: plain weight
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        # greedy rows' tokens from an int8 copy of the LM head, or None (greedy_head.GreedyHead.build);
        # built before _prepare, which gives back the head pages its quantisation read
        head = self.model.lm_head
        self.greedy_head = GreedyHead.build(head.weight, head.bias, self.softcap, self.gemm) if greedy_head else None
        self.head_parts = self._prepare(wrapped, packs) if prepack else None
        # small decode steps' layers as one C call each (decode_layer), or None: where it does not apply
        self.planned = PlannedLayers.build(self) if planned_layers and self.fused_ops else None
        self.max_positions = min(max_positions, getattr(cfg, "max_position_embeddings", max_positions))
        self.kv = KVCache(len(self.layers), self.kv_heads, self.head_dim, max_rows, self.max_positions,
                          self.dtype, self.device)

    def _qk_norms(self, attn: nn.Module) -> cpu_fused.Norms | Literal[False]:
        if not self.fused_ops:
            return False
        if not hasattr(attn, "q_norm"):
            return None
        q, k = (getattr(attn, n) for n in ("q_norm", "k_norm"))
        qp, kp = (m.c_params() if isinstance(m, FusedRMSNorm) else None for m in (q, k))
        return (qp, kp) if qp is not None and kp is not None else False

    def _residual_norms(self, layer: nn.Module) -> tuple[cpu_fused.NormParams, ...] | None:
        if not (self.fused_ops and self.sandwich):
            return None
        norms = [getattr(layer, n) for n in ("post_attention_layernorm", "pre_feedforward_layernorm",
                                             "post_feedforward_layernorm")]
        params = [m.c_params() if isinstance(m, FusedRMSNorm) else None for m in norms]
        return None if any(p is None for p in params) else tuple(p for p in params if p is not None)

    @staticmethod
    def _window(attn: nn.Module, model_type: str) -> int | None:
        if model_type == "mistral":
            return getattr(attn.config, "sliding_window", None)
        return getattr(attn, "sliding_window", None)

    def _wrap(self, lora_modules: tuple[str, ...]) -> dict[str, LoraLinear]:
        wrapped: dict[str, LoraLinear] = {}
        for i, layer in enumerate(self.layers):
            for parent_name in ("self_attn", "mlp"):
                parent = getattr(layer, parent_name)
                for name in lora_modules:
                    base = getattr(parent, name, None)
                    if isinstance(base, LoraLinear):
                        base = base.base
                    if isinstance(base, nn.Linear):
                        path = f"model.layers.{i}.{parent_name}.{name}"
                        wrapped[path] = LoraLinear(base, path, self.backend, self.gemm)
                        setattr(parent, name, wrapped[path])
        return wrapped

    def _prepare(self, wrapped: dict[str, LoraLinear], packs: list[PackedLinear]) -> list | None:
        """Give the unpacked projections and the LM head their weights in the GEMM's layout
        (``kernels.prepare``; packs did so themselves) and give back the originals' mmapped
        pages (transparent: the tied embedding still reads its rows). The head becomes
        ``head_chunk``-row slices, the pieces a forward runs it in. None: plain weights."""
        head = self.model.lm_head.weight
        probe = head[:1]
        if kernels.prepare(self.gemm, probe) is probe:
            return None
        in_pack = {id(part) for pack in packs for part in pack.parts}
        originals = [head]
        for lin in wrapped.values():
            if id(lin) not in in_pack:
                lin.operand = kernels.prepare(self.gemm, lin.base.weight)
                if kernels.plain(lin.operand) is not lin.base.weight:  # a Dual reads the original
                    originals.append(lin.base.weight)
        # bf16 on AMX: the head's slices in amx_head's layout instead of oneDNN's (faster at 5-64 rows)
        amx = self.dtype == torch.bfloat16 and kernels.native(self.gemm) and self.model.lm_head.bias is None
        parts = [(lo, min(lo + Forward.head_chunk, head.shape[0]),
                  (amx and amx_head.prepare(head[lo: lo + Forward.head_chunk]))
                  or kernels.prepare(self.gemm, head[lo: lo + Forward.head_chunk]))
                 for lo in range(0, head.shape[0], Forward.head_chunk)]
        log.info("weights in the GEMM's layout (%d MiB of mmapped originals released)",
                 pages.release(originals) >> 20)
        return parts

    def _pack(self, parent: nn.Module, names: tuple[str, ...], prepack: bool) -> PackedLinear | None:
        parts = [getattr(parent, n, None) for n in names]
        return PackedLinear(parts, self.gemm, prepack) if PackedLinear.can_pack(parts) else None

    # ---- forward (the public seams Forward drives) ----------------------------------------
    def start(self, chunks: list[Chunk], full_logits: bool = False) -> "Forward":
        """A forward over ``chunks`` (ordered so equal slots are adjacent) to advance piece
        by piece (see :class:`Forward`); it writes the chunks' K/V at their positions.
        ``full_logits``: every logit of every sampled row, even of greedy chunks."""
        return Forward(self, chunks, full_logits)

    def rope(self, h: torch.Tensor, pos: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer type -> (cos, sin) ``[N, 1, head_dim]`` for the token positions ``pos`` [N]."""
        out = {}
        for t in set(self.layer_types):
            if self._rope_by_type:
                cos, sin = self.inner.rotary_emb(h, pos[None], t)
            else:
                cos, sin = self.inner.rotary_emb(h, pos[None])
            out[t] = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # [N, 1, head_dim]
        return out

    def decoder_layer(self, i: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      plan: "_AttentionPlan", pos: torch.Tensor, rows: torch.Tensor, n_tok: int) -> torch.Tensor:
        """Decoder layer ``i`` over the step's hidden states ``h`` [N, hidden] -> [N, hidden];
        writes the layer's K/V of tokens at (``rows`` [N], ``pos`` [N]) into the cache. Where ``plan``
        says so (few decode tokens, base or adapter), one C call (:mod:`~.decode_layer`)."""
        if plan.planned:
            meta = current_batch()
            slots = meta.token_slots if meta is not None and meta.has_lora else None
            out = self.planned.run(i, h, *rope, rows, pos, self.kv.k[i], self.kv.v[i],  # type: ignore[union-attr]
                                   slots)
            if out is not None:  # else nothing was written: the path below
                return out
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        packed = self.qkv[i]
        q, k, v = packed(x) if packed is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q = q.view(n_tok, self.num_heads, self.head_dim)
        k = k.view(n_tok, self.kv_heads, self.head_dim)
        v = v.view(n_tok, self.kv_heads, self.head_dim)
        kc, vc = self.kv.k[i], self.kv.v[i]
        norms = self.qk_norms[i]
        prepped = None if norms is False else cpu_fused.attention_prep(q, k, v, norms, *rope, kc, vc, rows, pos)
        if prepped is not None:  # one C call: q/k norms, RoPE and the K/V writes, bitwise the ops below
            q = prepped
        else:
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self._rotate(q, *rope), self._rotate(k, *rope)
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
        o = plan.attend(q, kc, vc, self.windows[i], attn.scaling)  # [N, H, D]
        a = attn.o_proj(o.reshape(n_tok, self.num_heads * self.head_dim))
        if self.sandwich:
            return self._sandwich_tail(i, layer, h, a)
        h = h + a
        return h + self.mlp(i, layer.post_attention_layernorm(h))

    def _sandwich_tail(self, i: int, layer: nn.Module, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``h + post_ff(mlp(pre_ff(h + post_attn(a))))`` for layer ``i`` (Gemma 2/3): each
        residual add with its norms in one C call where it applies (bitwise the same)."""
        norms = self.residual_norms[i]
        got = None if norms is None else cpu_fused.residual_norm(a, h, norms[0], norms[1])
        if got is None:
            h = h + layer.post_attention_layernorm(a)
            x = layer.pre_feedforward_layernorm(h)
        else:
            h, x = got  # type: ignore[assignment]
        m = self.mlp(i, x)
        out = None if norms is None else cpu_fused.residual_norm(m, h, norms[2], None)
        return h + layer.post_feedforward_layernorm(m) if out is None else out[0]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of ``x`` [N, heads, D] with ``cos``/``sin`` [N, 1, D]: the C kernel where it
        applies (bitwise the same), else HF's formula in ATen ops."""
        if self.fused_ops:
            y = cpu_fused.rope(x, cos, sin)
            if y is not None:
                return y
        return cpu_fused.reference_rope(x, cos, sin)

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s gated MLP, ``down(act(gate(x)) * up(x))``, on ``x`` [N, hidden]."""
        mlp, packed = self.layers[i].mlp, self.gate_up[i]
        if packed is None:
            return mlp(x)
        gate, up = packed(x)
        return mlp.down_proj(mlp.act_fn(gate) * up)


class Forward:
    """One step's forward, advanced one piece (a decoder layer, the final norm, or a slice
    of the LM head) per :meth:`step`, so the engine can serve newly arrived prompts
    between pieces. Invariant between pieces: rows of this step are not moved or freed.
    Another forward that has run as many layers may be :meth:`absorb`-ed before the final
    norm: its tokens ride along for the remaining layers and the LM head (one weight pass
    for both, at a larger, cheaper-per-token GEMM)."""

    head_chunk = 32768  # LM-head rows per piece, while newcomers may be waiting

    @torch.inference_mode()
    def __init__(self, runner: ModelRunner, chunks: list[Chunk], full_logits: bool = False) -> None:
        self.r = runner
        # every sampled row is argmax-only: the greedy head may fill logits (-inf but candidates)
        self.argmax_only = not full_logits and all(c.argmax_only for c in chunks if c.sample)
        self._index(chunks)
        ids = [t for c in chunks for t in c.tokens]
        self.h = runner.inner.embed_tokens(torch.tensor(ids, device=runner.device))  # [N, hidden]
        self.rope = runner.rope(self.h, self.pos)
        self.layer = 0
        self.head_at = 0
        self.hs: torch.Tensor | None = None  # [num_sampling, hidden] final-normed rows, in chunk order
        self.logits: torch.Tensor | None = None  # [num_sampling, vocab], filled a vocab slice per piece
        # [num_sampling] token ids of argmax-only rows (the greedy head's, or the full head's first
        # maxima, reduced slice by slice into _best: (value, index) [num_sampling]); logits stay None
        self.tokens: list[int] | None = None
        self._best: tuple[torch.Tensor, torch.Tensor] | None = None
        # the greedy head's estimate in vocabulary slices (GreedyHead.pieces; a slice per piece unless
        # whole_head), None before the head's first piece, False where it does not apply or is done
        self._greedy: Iterator[bool | tuple[torch.Tensor, torch.Tensor] | None] | Literal[False] | None = None

    def _index(self, chunks: list[Chunk]) -> None:
        """The per-token bookkeeping of ``chunks`` in this order (equal slots adjacent):
        positions and KV rows [N], LoRA segments, attention plan."""
        dev = self.r.device
        positions: list[int] = []
        rows: list[int] = []
        slots: list[int] = []
        for c in chunks:
            n = len(c.tokens)
            positions += range(c.start_pos, c.start_pos + n)
            rows += [c.row] * n
            slots += [c.slot] * n
        self.chunks = chunks
        self.n_tok = len(positions)
        self.pos = torch.tensor(positions, device=dev)
        self.rows = torch.tensor(rows, device=dev)
        lora = LoraBatch.from_token_slots(slots, dev)
        self.lora = lora if lora.has_lora else None
        self.plan = _AttentionPlan(chunks, self.r.kv.num_rows, self.r.windows, dev)
        planned = self.r.planned
        self.plan.planned = planned is not None and not self.plan.prefill and 0 < self.n_tok <= planned.max_rows

    @property
    def progress(self) -> float:
        """Fraction of the decoder layers done, in [0, 1]."""
        return self.layer / len(self.r.layers)

    @property
    def in_layers(self) -> bool:
        """True until the final norm: another forward may still be :meth:`absorb`-ed."""
        return self.hs is None

    @torch.inference_mode()
    def step(self, whole_head: bool = False, interrupt: Callable[[], bool] | None = None) -> bool:
        """Advance one piece; False once ``logits`` (or, for argmax-only rows, ``tokens``) is
        ready. ``whole_head``: the rest of the LM head in one GEMM (no newcomer waits; one 262k-row
        GEMV measured ~25 % faster at one row than eight slices copied into place). The greedy
        head's estimate runs in slices anyway: with ``whole_head`` it still stops after a slice
        once ``interrupt()`` is true (a newcomer arrived meanwhile), so that one need not wait for
        the rest of the head."""
        r = self.r
        if self.layer < len(r.layers):
            i = self.layer
            with use_batch(self.lora):
                self.h = r.decoder_layer(i, self.h, self.rope[r.layer_types[i]], self.plan, self.pos, self.rows,
                                         self.n_tok)
            self.layer += 1
            return True
        if self.hs is None:
            self._final_norm()
            if self.hs.shape[0] == 0:
                self.logits = self.hs.new_empty(0, r.config.vocab_size)
            return self.hs.shape[0] > 0
        return self._head_piece(whole_head, interrupt)

    def _head_piece(self, whole_head: bool, interrupt: Callable[[], bool] | None = None) -> bool:
        """One piece of the LM head (the rest of it with ``whole_head``); False once done. Rows
        that only need their argmax take the greedy head's tokens where it applies, else each
        slice is reduced to its first maximum as it is computed (the full [rows, vocab] logits are
        never stored: at 64 x 262k their allocation alone cost ~7 ms of page faults)."""
        r = self.r
        head = r.model.lm_head
        vocab = head.weight.shape[0]
        if self.head_at >= vocab:  # done: a further step changes nothing (softcap is not applied twice)
            return False
        hs = self.hs
        assert hs is not None  # after the final norm
        if self._greedy is None:  # the head's first piece: the greedy head's estimate, where it applies
            takes = self.argmax_only and r.greedy_head is not None and r.greedy_head.takes(len(hs))
            self._greedy = r.greedy_head.pieces(hs, self.head_chunk) if takes else False  # type: ignore[union-attr]
        if self._greedy:
            got = next(self._greedy)
            while got is False and whole_head and not (interrupt is not None and interrupt()):
                got = next(self._greedy)  # a slice of the estimate done; nobody waits
            if got is False:
                return True  # newcomers may be served before the next slice
            self._greedy = False
            if got is not None:  # else a row it cannot bound (or out of memory): the full head
                self.tokens, self.head_at = got[0].tolist(), vocab
                return False
        if self.head_at == 0:
            if not self.argmax_only:
                self.logits = hs.new_empty(hs.shape[0], vocab)  # filled piece by piece
        lo = self.head_at
        hi = vocab if whole_head else min(lo + self.head_chunk, vocab)
        if r.head_parts is not None:  # prepared slices (each head_chunk rows, as head_at advances)
            for plo, phi, operand in r.head_parts:
                if not lo <= plo < hi:
                    continue
                if isinstance(operand, amx_head.Part):  # (no bias)
                    got = amx_head.first_max(hs, operand) if self.argmax_only and not r.softcap else None
                    if got is not None:  # argmax-only rows: the slice's first maxima, no logits written
                        self._best = merge_max(got[0], got[1] + plo, self._best)
                    else:
                        self._take(plo, amx_head.linear(hs, operand))
                    continue
                self._take(plo, r.gemm(hs, operand, None if head.bias is None else head.bias[plo:phi]))
        else:
            self._take(lo, r.gemm(hs, head.weight[lo:hi], None if head.bias is None else head.bias[lo:hi]))
        self.head_at = hi
        if hi < vocab:
            return True
        if self.argmax_only:
            self.tokens = self._best[1].tolist()  # type: ignore[index]
        return False

    def _take(self, lo: int, block: torch.Tensor) -> None:
        """Logits ``block`` [rows, n] of vocabulary ids ``lo .. lo + n - 1`` (softcapped here, as
        the whole row would be): into ``logits``, or for argmax-only rows into the running first
        maximum (:func:`~.sampling.first_max`)."""
        if self.r.softcap:
            block = torch.tanh(block / self.r.softcap) * self.r.softcap
        if not self.argmax_only:
            if lo == 0 and block.shape[1] == self.logits.shape[1]:  # type: ignore[union-attr]
                self.logits = block
            else:
                self.logits[:, lo: lo + block.shape[1]] = block  # type: ignore[index]
            return
        self._best = first_max(block, lo, self._best)

    def run_to(self, layer: int) -> None:
        """Run decoder layers until ``layer`` of them are done (at most all of them)."""
        while self.layer < min(layer, len(self.r.layers)):
            self.step()

    @torch.inference_mode()
    def absorb(self, other: "Forward") -> None:
        """Carry ``other``'s chunks in this forward from here on. Both are in their layers and
        have run the same number (:meth:`run_to`); each token keeps its hidden state, KV row
        and slot, so it computes what it would alone (up to the GEMM's summation order). Chunks
        are re-ordered by slot (stable, this forward's first) so equal slots stay adjacent:
        :attr:`chunks` is the new order, which the logits and tokens rows follow."""
        if not (self.in_layers and other.in_layers and other.layer == self.layer):
            raise RuntimeError("absorb needs two forwards in their layers, at the same layer")
        spans, off = [], 0
        for c in self.chunks + other.chunks:
            spans.append((c, off))
            off += len(c.tokens)
        spans.sort(key=lambda s: s[0].slot)
        order = torch.tensor([i for c, o in spans for i in range(o, o + len(c.tokens))], device=self.r.device)
        self.h = torch.cat([self.h, other.h]).index_select(0, order)
        self.rope = {t: (torch.cat([cos, other.rope[t][0]]).index_select(0, order),
                         torch.cat([sin, other.rope[t][1]]).index_select(0, order))
                     for t, (cos, sin) in self.rope.items()}
        self._index([c for c, _ in spans])
        self.argmax_only = self.argmax_only and other.argmax_only

    @torch.inference_mode()
    def _final_norm(self) -> None:
        r = self.r
        if self.hs is not None:
            return
        for c in self.chunks:
            r.kv.lengths[c.row] = c.start_pos + len(c.tokens)
        last = [off + len(c.tokens) - 1 for c, off in zip(self.chunks, self.plan.offsets) if c.sample]
        self.hs = r.inner.norm(self.h.index_select(0, torch.tensor(last, dtype=torch.long, device=r.device)))


class _AttentionPlan:
    """Per-step attention bookkeeping shared by all layers: single-token chunks attend
    in one batched call over the dense KV rows; multi-token chunks attend row by row."""

    def __init__(self, chunks: list[Chunk], num_rows: int, windows: list[int | None], dev: torch.device) -> None:
        self.offsets, off = [], 0
        dec_tok, dec_rows, dec_pos = [], [], []
        self.prefill: list[tuple[int, Chunk]] = []
        self._masks: dict[tuple[int, int | None], tuple[int, torch.Tensor]] = {}
        for c in chunks:
            self.offsets.append(off)
            if len(c.tokens) == 1:
                dec_tok.append(off)
                dec_rows.append(c.row)
                dec_pos.append(c.start_pos)
            else:
                self.prefill.append((off, c))
            off += len(c.tokens)
        self.num_tokens = off
        self.num_rows = num_rows
        # every token a decode token, few enough for the runner's planned layers (set by Forward)
        self.planned = False
        self.has_decode = bool(dec_tok)
        if not self.has_decode:
            return
        self.identity = dec_rows == list(range(num_rows)) and dec_tok == list(range(num_rows))
        self.dec_tok = torch.tensor(dec_tok, device=dev)
        self.dec_rows = torch.tensor(dec_rows, device=dev)
        self.hi = max(dec_pos) + 1
        self._decode = (dec_pos, set(windows), dev)
        # window -> (first key position, mask [rows, 1, 1, L]); built on the first attend (a planned
        # step never attends here)
        self._dec_masks: dict[int | None, tuple[int, torch.Tensor]] | None = None

    @property
    def masks(self) -> dict[int | None, tuple[int, torch.Tensor]]:
        """Per window, (first key position, the decode rows' mask [rows, 1, 1, keys])."""
        if self._dec_masks is None:
            dec_pos, windows, dev = self._decode
            qpos = torch.full((self.num_rows,), -1, dtype=torch.long, device=dev)
            qpos[self.dec_rows] = torch.tensor(dec_pos, device=dev)
            self._dec_masks = {}
            for w in windows:
                lo = 0 if w is None else max(0, min(dec_pos) - w + 1)
                kpos = torch.arange(lo, self.hi, device=dev)
                mask = kpos[None, :] <= qpos[:, None]  # [rows, L]
                if w is not None:
                    mask &= kpos[None, :] > (qpos[:, None] - w)
                mask[qpos < 0, 0] = True  # rows not decoding this step: any finite row, output unused
                self._dec_masks[w] = (lo, mask[:, None, None, :])  # [rows, 1, 1, L]
        return self._dec_masks

    def attend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, window: int | None,
               scale: float) -> torch.Tensor:
        """``q`` [N, H, D] against the cache (this step's K/V already written) -> [N, H, D]."""
        n, heads, d = q.shape
        kvh = kc.shape[1]
        out = torch.empty_like(q) if (self.prefill or not self.identity) else None
        if self.has_decode:
            lo, mask = self.masks[window]
            if self.identity:
                qd = q
            else:
                qd = q.new_zeros(self.num_rows, heads, d)
                qd[self.dec_rows] = q.index_select(0, self.dec_tok)
            k = kc[: self.num_rows, :, lo: self.hi]
            v = vc[: self.num_rows, :, lo: self.hi]
            o = F.scaled_dot_product_attention(qd.view(self.num_rows, kvh, heads // kvh, d), k, v,
                                               attn_mask=mask, scale=scale)
            o = o.reshape(self.num_rows, heads, d)
            if out is None:
                return o
            out[self.dec_tok] = o.index_select(0, self.dec_rows)
        for i, (off, c) in enumerate(self.prefill):
            t, end = len(c.tokens), c.start_pos + len(c.tokens)
            lo, mask = self._prefill_mask(i, c, window, q.device)
            qc = q[off: off + t].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            o = F.scaled_dot_product_attention(qc, kc[c.row: c.row + 1, :, lo:end], vc[c.row: c.row + 1, :, lo:end],
                                               attn_mask=mask, scale=scale, enable_gqa=kvh != heads)
            out[off: off + t] = o[0].transpose(0, 1)
        return out

    def _prefill_mask(self, i: int, c: Chunk, window: int | None, dev: torch.device) -> tuple[int, torch.Tensor]:
        """(first key position, causal/sliding mask [T, keys]) of prefill chunk ``i``; built
        once per step and window, not once per layer."""
        key = (i, window)
        if key not in self._masks:
            end = c.start_pos + len(c.tokens)
            lo = 0 if window is None else max(0, c.start_pos - window + 1)
            qpos = torch.arange(c.start_pos, end, device=dev)
            kpos = torch.arange(lo, end, device=dev)
            mask = kpos[None, :] <= qpos[:, None]
            if window is not None:
                mask &= kpos[None, :] > qpos[:, None] - window
            self._masks[key] = (lo, mask)
        return self._masks[key]
