"""The trainable model: base causal LM + PEFT LoRA, with a loss that only computes logits where labels count.

With a 262k vocabulary the LM head dominates a small model's step: a [B, T, V] fp32 logits
tensor is computed, soft-maxed and back-propagated for every position, including padding
and prompt tokens whose label is -100. :class:`SelectedTokenLoss` gathers the hidden states
of the positions that carry a loss first ([N, H], N = number of labels != -100) and applies
the (frozen, tied) head only there. The loss value is the same sum / count as HF's
``ForCausalLMLoss``, up to float rounding.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from adapterctl.errors import InvalidArgument
from adapterctl.trainer.config import TrainConfig
from adapterctl.trainer.data import IGNORE_INDEX

log = logging.getLogger(__name__)


class SelectedTokenLoss:
    """Mixin placed in front of a ``*ForCausalLM`` class. With ``labels`` the forward returns
    ``loss`` (sum of token cross-entropies / ``num_items_in_batch`` or / token count) and no
    logits; without labels it is the stock forward (generation is unchanged)."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any):
        if labels is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("use_cache", None)
        kwargs.pop("logits_to_keep", None)
        decoder = getattr(self, self.base_model_prefix)
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        ).last_hidden_state
        target = labels[:, 1:]                      # [B, T-1]: token t+1 is predicted at position t
        keep = target != IGNORE_INDEX               # [B, T-1]
        selected = hidden[:, :-1][keep]             # [N, H]
        logits = self.lm_head(selected)             # [N, V]
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss_sum = F.cross_entropy(logits.float(), target[keep], reduction="sum")
        if num_items_in_batch is None:
            num_items_in_batch = keep.sum().clamp(min=1)
        elif torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return CausalLMOutputWithPast(loss=loss_sum / num_items_in_batch)


def install_selected_token_loss(causal_lm: torch.nn.Module) -> None:
    """Give ``causal_lm`` (the model PEFT wraps) the selected-token loss, in place."""
    cls = type(causal_lm)
    if isinstance(causal_lm, SelectedTokenLoss):
        return
    if not hasattr(causal_lm, "lm_head") or not hasattr(causal_lm, getattr(causal_lm, "base_model_prefix", "")):
        log.info("%s has no lm_head/decoder pair; using the stock loss", cls.__name__)
        return
    causal_lm.__class__ = type(cls.__name__, (SelectedTokenLoss, cls), {"__module__": cls.__module__})


def lora_config(config: TrainConfig):
    from peft import LoraConfig

    targets: Any = "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                      use_rslora=config.use_rslora, use_dora=config.use_dora, bias="none", task_type="CAUSAL_LM")


def build_model(config: TrainConfig, base_path: str):
    """Load the base in fp32, seed, wrap with LoRA. Seeding here makes LoRA init reproducible."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(config.seed)
    if not config.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with warnings.catch_warnings():  # deprecation noise from transformers/PEFT internals, not actionable
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model.config.use_cache = False
        try:
            peft_model = get_peft_model(model, lora_config(config))
        except ValueError as exc:  # PEFT: target modules not found in the base model
            raise InvalidArgument(f"LoRA setup failed: {exc}") from exc
    install_selected_token_loss(peft_model.get_base_model())
    return peft_model
