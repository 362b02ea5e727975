"""The speed paths change nothing but speed: selected-token loss == HF loss; packed == padded."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def lora_pair(tiny_base):
    """(stock PEFT model, same weights with the selected-token loss), LoRA B randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterctl.trainer.model import install_selected_token_loss

    def make():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base.path), dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        return model

    stock, fast = make(), make()
    install_selected_token_loss(fast.get_base_model())
    return stock, fast


def _records():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, masked in [(7, 0), (12, 4), (3, 0), (9, 9)]:  # the last has no label at all
        ids = torch.randint(10, 3000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return out


def _loss_and_grads(model, batch, num_items=None):
    model.zero_grad()
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("num_items", [None, 17])
def test_selected_token_loss_matches_stock_and_packing_matches_padding(lora_pair, num_items):
    from adapterctl.trainer.collate import PaddingFreeCollator, RightPadCollator

    stock, fast = lora_pair
    padded = RightPadCollator(pad_id=0)(_records())
    packed = PaddingFreeCollator(pad_id=0)(_records())
    assert packed["input_ids"].shape == (1, 31) and "attention_mask" not in packed
    assert packed["position_ids"][0, :8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    ref_loss, ref_grads = _loss_and_grads(stock, padded, num_items)
    for batch in (padded, packed):
        loss, grads = _loss_and_grads(fast, batch, num_items)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_large_batches_fall_back_to_padding():
    from adapterctl.trainer.collate import PaddingFreeCollator

    batch = PaddingFreeCollator(pad_id=0, max_packed_tokens=20)(_records())
    assert batch["input_ids"].shape == (4, 12) and "attention_mask" in batch
