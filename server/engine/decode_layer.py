"""A Gemma 3 decoder layer of a decode step (bf16 or fp32) as one C call (``decode_layer.c``).

At one row the kernels of a bf16 step (the C GEMVs of :mod:`cpu_gemv`, the norms of
:mod:`cpu_fused`) stream the weights at the memory's pace, and the Python between them was the
rest: ~4-5 ms of a ~14 ms Gemma 3 270M step on Zen 4 (eight kernel calls a layer with their
checks, ATen's attention with its masks and views, GELU, a multiply). :class:`PlannedLayers`
plans each layer once at load time (weight pointers, norm scales, shapes) and a step then makes
one C call a layer, which drives the same kernels, so norms, projections, RoPE and the K/V writes
are bitwise the Python path's; attention and GELU are computed in C in fp32, rounded where ATen
rounds them, and may differ from ATen's by a bf16 ulp (``decode_layer.c``).

It applies where the runner is bf16 on CPU with a C GEMV for its GEMM (``kernels.small_rows_linear``:
1-4 rows, and on AMX hosts 5-64 through the AMX GEMM of :mod:`amx_gemm`, which that GEMM sends those
rows to as well; ``kernels.upcast_linear``: 1-32), or fp32 with the panel GEMM of :mod:`panel_gemm`
(AVX-512F or AVX2; 1-64 rows, the fused kernels' limit at Gemma 3 270M's 4 heads), the model is Gemma 3's
layout (sandwich norms, q/k norms, tanh GELU, no biases) with every norm on the C kernel, and the
step's tokens are decode tokens (no prompt chunk; ``runner.Forward`` decides). Adapter tokens
take it too: after each projection the C call adds each token's LoRA delta from its adapter's
pages of the bank (:class:`~.slots.SlotBank`, re-pointed when a bank is allocated), rounded in
PEFT's bf16 order as :mod:`~.lora` adds it (a delta's fp32 sums may differ from ATen's bmm by a
bf16 ulp). Elsewhere :meth:`PlannedLayers.build` is None and every layer runs as before.

In fp32 the same kernels' fp32 variants run (norms, RoPE, the K/V writes, the panel GEMM and the
LoRA kernel, so those are bitwise the Python path's); attention (a token's query heads of a KV
group read each K/V row once, q.k in four FMA chains) and GELU are fp32 in C, within a few fp32
ulps of ATen's. On the 2-core AMX Xeon (Dec 7, ``bench.step_bench --dtype bfloat16 --baseline onednn``,
which keeps the Python path and oneDNN's GEMM at 5-64 rows) bf16 steps ran 1.37x faster at 8 rows,
1.40x at 16, 1.37x at 32 and 1.26x at 64. In fp32, on the 2-core Xeon without bf16 units
(``bench.step_bench --baseline unplanned``, full head), steps ran 1.25-1.30x faster at 1 row,
1.20-1.22x at 16, 1.09-1.13x at 32 and 1.07-1.10x at 64 (three runs).
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adapterctl.server.engine import amx_gemm, cpu_build, cpu_fused, cpu_gemv, kernels, lora_cpu, panel_gemm

if TYPE_CHECKING:
    from adapterctl.server.engine.lora import LoraLinear
    from adapterctl.server.engine.runner import ModelRunner
    from adapterctl.server.engine.slots import SlotBank

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_layer.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float


class _Plan(ctypes.Structure):
    _fields_ = [("gemv", _P), ("norm", _P), ("residual", _P), ("prep", _P), ("lora", _P), ("hidden", _L),
                ("heads", _L), ("kvh", _L), ("d", _L), ("inter", _L), ("max_rows", _L), ("lora_scale", _P),
                ("max_rank", _L), ("gemm", _P), ("gemv_rows", _L)]


class _Lora(ctypes.Structure):
    _fields_ = [("a", _P), ("bt", _P), ("ranks", _P)]


# the projections in decode_layer.c's Lora order (L_Q .. L_DOWN)
LORA_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_LAYER_FIELDS: list[tuple[str, Any]] = [
    *((n, _P) for n in ("qkv", "o", "gate_up", "down", "input_norm", "q_norm", "k_norm", "post_attn", "pre_ff",
                        "post_ff")),
    *((n, _F) for n in ("input_eps", "q_eps", "k_eps", "post_attn_eps", "pre_ff_eps", "post_ff_eps")),
    ("window", _L), ("scale", _F), ("kc", _P), ("vc", _P),
    *((n, _L) for n in ("row_cap", "pos_cap", "c_row", "c_head", "c_pos")),
    ("lora", _Lora * len(LORA_ORDER))]


class _Layer(ctypes.Structure):
    _fields_ = _LAYER_FIELDS


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded layer kernel, or None (no compiler, not an AVX2 host; logged once)."""
    lib = cpu_build.load(SOURCE, FLAGS, "planned decode layer")
    if lib is None:
        return None
    lib.decode_layer_bf16.argtypes = [_P, _P, _L, _P, _P, _P, _P, _L, _P, _P, _P, _P, ctypes.c_int]
    lib.decode_layer_bf16.restype = ctypes.c_int
    lib.decode_layer_scratch.argtypes = [_P]
    lib.decode_layer_scratch.restype = _L
    lib.decode_layer_f32.argtypes = lib.decode_layer_bf16.argtypes
    lib.decode_layer_f32.restype = ctypes.c_int
    lib.gelu_mul_bf16.argtypes = [_P, _L, _L, _P]
    lib.gelu_mul_f32.argtypes = [_P, _L, _L, _P, ctypes.c_int]
    lib.gelu_mul_bf16.restype = lib.gelu_mul_f32.restype = None
    agree, err = _gelu_agreement(lib), _gelu_f32_error(lib)
    if agree < GELU_AGREEMENT or not err <= GELU_F32_ERROR:
        log.warning("planned decode layer: its GELU matches ATen's on %.4f of the probe in bf16 (< %s) or is %.3g "
                    "off in fp32 (> %s); not using it", agree, GELU_AGREEMENT, err, GELU_F32_ERROR)
        return None
    return lib


# fraction of the probe's outputs bitwise ATen's (the rest: one bf16 ulp, or both ~0 where tanh saturates; tested)
GELU_AGREEMENT = 0.995


# fp32: the largest |C - ATen| / (|ATen| + 2^-23 |gate| |up|) on the probe: the second term is an fp32 ulp of
# 1 + tanh where it cancels (gates below ~-2), so this bounds the error to a few ulps of what the product could
# round to (measured 0.5; a GELU off by a factor of 2 would be ~1)
GELU_F32_ERROR = 0.75


def gelu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """The C ``gelu_tanh(gate) * up`` of ``gate_up`` [n, 2 * inter] (contiguous bf16, each product
    rounded as ATen rounds it, or fp32) -> [n, inter]."""
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype)
    if gate_up.dtype == torch.float32:
        lib.gelu_mul_f32(gate_up.data_ptr(), n, inter, out.data_ptr(), torch.get_num_threads())
    else:
        lib.gelu_mul_bf16(gate_up.data_ptr(), n, inter, out.data_ptr())
    return out


def probe_gate_up() -> torch.Tensor:
    """[3, 2 * 1003] bf16: gates from -12 to 12 (the tails where tanh saturates too), random ups."""
    gen = torch.Generator().manual_seed(0)
    gate = torch.linspace(-12, 12, 3 * 1003).view(3, 1003)
    return torch.cat([gate, torch.randn(3, 1003, generator=gen) * 3], dim=1).bfloat16()


def gelu_f32_error(got: torch.Tensor, gate_up: torch.Tensor) -> float:
    """The largest ``|got - ATen| / (|ATen| + 2^-23 |gate| |up|)`` of fp32 ``got`` against ATen's
    ``gelu_tanh(gate) * up`` of ``gate_up`` (fp32)."""
    gate, up = gate_up.chunk(2, dim=1)
    want = torch.nn.functional.gelu(gate, approximate="tanh") * up
    return float(((got - want).abs() / (want.abs() + 2.0 ** -23 * gate.abs() * up.abs())).max())


def _gelu_f32_error(lib: ctypes.CDLL) -> float:
    gate_up = probe_gate_up().float()
    return gelu_f32_error(gelu_mul(lib, gate_up), gate_up)


def _gelu_agreement(lib: ctypes.CDLL) -> float:
    """Fraction of :func:`probe_gate_up`'s outputs where the C GELU is bitwise ATen's."""
    gate_up = probe_gate_up()
    gate, up = gate_up.chunk(2, dim=1)
    want = torch.nn.functional.gelu(gate, approximate="tanh") * up
    return float((gelu_mul(lib, gate_up) == want).float().mean())


def _gemv_kernel(gemm: kernels.Gemm, widths: tuple[int, ...]) -> cpu_gemv.Kernel | None:
    """The C GEMV ``gemm`` sends small bf16 row counts of these input widths to, or None."""
    if gemm is kernels.small_rows_linear:
        return cpu_gemv.AVX512_BF16
    if gemm is kernels.upcast_linear:
        return cpu_gemv.upcast_kernel(*widths)
    return None


def _operand(lin) -> Any:
    """The operand a LoraLinear's GEMM reads (None: its base is biased)."""
    return None if lin.base.bias is not None else lin.operand if lin.operand is not None else lin.base.weight


def _weight(operand: Any, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
    """The tensor the C layer reads for a GEMM ``operand`` of ``shape`` [out, in]: bf16 its plain
    contiguous rows, fp32 its panel GEMM panels; None where it has neither."""
    if operand is None:
        return None
    if dtype == torch.float32:
        ok = isinstance(operand, panel_gemm.Panels) and operand.shape == shape and operand.data.is_contiguous()
        return operand.data if ok else None
    w = kernels.plain(operand)
    return w if w.dtype == torch.bfloat16 and tuple(w.shape) == shape and w.is_contiguous() else None


class PlannedLayers:
    """The decoder layers of a :class:`~.runner.ModelRunner`, each one C call for 1..``max_rows``
    base decode tokens (:meth:`run`)."""

    def __init__(self, lib: ctypes.CDLL, plan: _Plan, layers: list[_Layer], keep: list[torch.Tensor],
                 bank: "SlotBank", lora: list[list["LoraLinear"]], dtype: torch.dtype = torch.bfloat16) -> None:
        self.lib, self.plan, self.layers, self.dtype = lib, plan, layers, dtype
        self._call = lib.decode_layer_f32 if dtype == torch.float32 else lib.decode_layer_bf16
        self.max_rows, self.hidden = plan.max_rows, plan.hidden
        self._keep = keep  # the runner's weights and norm scales the plan points into, kept alive with it
        self._caches: list[tuple[int, ...] | None] = [None] * len(layers)  # (kc, vc, shape) each plan points at
        self.scratch = torch.empty(lib.decode_layer_scratch(ctypes.byref(plan)), dtype=dtype)
        # per layer, its projections in LORA_ORDER; their slot banks are pointed at as the bank allocates them
        self.bank, self._lora, self._generation = bank, lora, -1

    def _point_lora(self) -> None:
        """Point every layer's LoRA entries at its projections' slot banks (NULL: none allocated)."""
        for layer, mods in zip(self.layers, self._lora):
            for j, mod in enumerate(mods):
                w = mod.weights
                layer.lora[j] = _Lora(0, 0, 0) if w is None else _Lora(w.A.data_ptr(), w.Bt.data_ptr(),
                                                                          w.rank_table.data_ptr())
        self._generation = self.bank.generation

    @classmethod
    def build(cls, runner: "ModelRunner") -> "PlannedLayers | None":
        """The runner's layers planned, or None where this does not apply (see the module docstring)."""
        cfg, bank = runner.config, runner.bank
        hidden, heads, kvh, d = cfg.hidden_size, runner.num_heads, runner.kv_heads, runner.head_dim
        inter = cfg.intermediate_size
        if (runner.device.type != "cpu" or not runner.sandwich or heads % kvh or bank.max_rank > lora_cpu.MAX_RANK
                or getattr(cfg, "hidden_activation", None) != "gelu_pytorch_tanh"
                or any(k > lora_cpu.MAX_IN for k in (hidden, heads * d, inter))):
            return None
        kernels_ = cls._kernels(runner, (hidden, heads * d, inter))
        lib = library()
        if kernels_ is None or lib is None:
            return None
        fns, max_rows, wide = kernels_
        keep: list[torch.Tensor] = [bank.scale]
        layers, lora = [], []
        for i, layer in enumerate(runner.layers):
            planned = cls._layer(runner, i, layer, (hidden, heads, kvh, d, inter), keep)
            mods = cls._lora_modules(runner, i)
            if planned is None or mods is None:
                return None
            layers.append(planned)
            lora.append(mods)
        plan = _Plan(*(ctypes.cast(f, ctypes.c_void_p).value for f in fns), hidden, heads, kvh, d, inter,
                     min(max_rows, cpu_fused.MAX_ROWS // heads), bank.scale.data_ptr(), bank.page_rank, *wide)
        log.info("decoder layers planned as one C call each for 1-%d %s decode rows (base or adapter)",
                 plan.max_rows, str(runner.dtype).rsplit(".", 1)[-1])
        return cls(lib, plan, layers, keep, bank, lora, runner.dtype)

    @staticmethod
    def _kernels(runner: "ModelRunner", widths: tuple[int, ...]
                 ) -> tuple[tuple[Any, ...], int, tuple[int | None, int]] | None:
        """(the GEMM, norm, residual norm, attention prep and LoRA kernels of the runner's dtype, the
        most rows its GEMMs take, (the bf16 GEMM for more rows than the first takes or None, those
        rows)), or None where its dtype and GEMM have none here: bf16 with a C GEMV (its
        ``k_multiple``; the LoRA kernel wants inputs of a multiple of 8), with the AMX GEMM beyond it
        where :func:`kernels.small_rows_linear` sends those rows there; fp32 with the panel GEMM."""
        fused, lora_lib = cpu_fused.library(), lora_cpu.library()
        if fused is None or lora_lib is None:
            return None
        if runner.dtype == torch.float32 and runner.gemm is kernels.panel_linear:
            panel = panel_gemm.library()
            if panel is None:
                return None
            return (panel.gemm_f32, fused.rms_norm_f32, fused.residual_norm_f32, fused.attention_prep_f32,
                    lora_lib.lora_fp32), cpu_fused.MAX_ROWS, (None, cpu_fused.MAX_ROWS)
        kernel = _gemv_kernel(runner.gemm, widths)
        gemv = None if kernel is None or runner.dtype != torch.bfloat16 else cpu_gemv.library(kernel)
        if kernel is None or gemv is None or any(k % kernel.k_multiple for k in widths):
            return None
        fns = (gemv.gemv_bf16, fused.rms_norm_bf16, fused.residual_norm_bf16, fused.attention_prep_bf16,
               lora_lib.lora_bf16)
        amx = amx_gemm.library() if runner.gemm is kernels.small_rows_linear else None
        hidden, qw, inter = widths
        outs = (qw + 2 * runner.kv_heads * runner.head_dim, hidden, 2 * inter)
        if amx is not None and not any(w % amx_gemm.MULTIPLE for w in (*widths, *outs)):
            return fns, amx_gemm.MAX_ROWS, (ctypes.cast(amx.amx_gemm_bf16, ctypes.c_void_p).value, kernel.max_rows)
        return fns, kernel.max_rows, (None, kernel.max_rows)

    @staticmethod
    def _lora_modules(runner: "ModelRunner", i: int) -> list["LoraLinear"] | None:
        """Layer ``i``'s projections in LORA_ORDER, or None where one is not a LoraLinear."""
        from adapterctl.server.engine.lora import LoraLinear

        attn, mlp = runner.layers[i].self_attn, runner.layers[i].mlp
        qkv, gate_up = runner.qkv[i], runner.gate_up[i]
        mods = [*(qkv.parts if qkv else ()), attn.o_proj, *(gate_up.parts if gate_up else ()), mlp.down_proj]
        if len(mods) != len(LORA_ORDER) or not all(isinstance(m, LoraLinear) for m in mods):
            return None
        return mods

    @staticmethod
    def _layer(runner: "ModelRunner", i: int, layer, dims: tuple[int, ...], keep: list[torch.Tensor]
               ) -> _Layer | None:
        hidden, heads, kvh, d, inter = dims
        qkv, gate_up, attn, mlp = runner.qkv[i], runner.gate_up[i], layer.self_attn, layer.mlp
        qk, res = runner.qk_norms[i], runner.residual_norms[i]
        if qkv is None or gate_up is None or not qk or res is None or qkv.bias is not None or gate_up.bias is not None:
            return None
        norm = layer.input_layernorm.c_params() if hasattr(layer.input_layernorm, "c_params") else None
        shapes = [(heads * d + 2 * kvh * d, hidden), (hidden, heads * d), (2 * inter, hidden), (hidden, inter)]
        ops = [qkv.weight, _operand(attn.o_proj), gate_up.weight, _operand(mlp.down_proj)]
        weights = [_weight(w, s, runner.dtype) for w, s in zip(ops, shapes)]
        if norm is None or any(w is None for w in weights):
            return None
        scales = [norm, *qk, *res]  # input, q, k, post-attention, pre- and post-feedforward: (fp32 scale, eps)
        keep += [*weights, *(s for s, _ in scales)]
        return _Layer(*(w.data_ptr() for w in weights), *(s.data_ptr() for s, _ in scales), *(e for _, e in scales),
                      runner.windows[i] or 0, attn.scaling)

    def run(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
            pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor | None = None
            ) -> torch.Tensor | None:
        """Layer ``i`` over decode tokens ``h`` [n, hidden] (contiguous bf16, n <= max_rows) at cache
        rows ``rows`` and positions ``pos`` [n] (int64, contiguous), LoRA slots ``slots`` [n] (int64,
        contiguous, 0: base; None: all base), ``cos``/``sin`` [n, 1, d] -> [n, hidden], having written
        their K/V into ``kc``/``vc`` [row_cap, kvh, pos_cap, d]; None (nothing written) where a row or
        position is outside the caches, or ``h``, ``cos``, ``sin``, ``slots`` are not as described."""
        if (not h.is_contiguous() or h.dtype != self.dtype or cos.dtype != self.dtype
                or sin.stride() != cos.stride()):
            return None
        if slots is not None:
            if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.device.type != "cpu":
                return None
            if self._generation != self.bank.generation:
                self._point_lora()
        layer = self.layers[i]
        cache = (kc.data_ptr(), vc.data_ptr(), *kc.shape)
        if self._caches[i] != cache:  # the caches are re-allocated as they grow: re-point the plan
            layer.kc, layer.vc = cache[0], cache[1]
            layer.row_cap, layer.pos_cap, layer.c_row, layer.c_head, layer.c_pos = kc.shape[0], kc.shape[2], \
                *kc.stride()[:3]
            self._caches[i] = cache
        n = h.shape[0]
        out = torch.empty((n, self.hidden), dtype=self.dtype)
        rc = self._call(ctypes.addressof(self.plan), ctypes.addressof(layer), n, h.data_ptr(), out.data_ptr(),
                        cos.data_ptr(), sin.data_ptr(), cos.stride(0), rows.data_ptr(), pos.data_ptr(),
                        None if slots is None else slots.data_ptr(), self.scratch.data_ptr(), torch.get_num_threads())
        return out if rc == 0 else None
