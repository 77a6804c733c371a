"""PEFT DoRA on Conv layers: PEFT stores the magnitude as (1, out, 1, 1), always per output channel.

Oracle: PEFT's own merged weight (`merge_and_unload`) of a model it built and saved.
"""
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

from lycoris_core.adapter_file import load_file  # noqa: E402


class TwoConvs(nn.Module):
    def __init__(self, square: int, wide: int):
        super().__init__()
        self.square = nn.Conv2d(square, square, 3, padding=1)  # in == out: the ambiguous shape
        self.wide = nn.Conv2d(square, wide, 1)  # in != out: a shape no input axis fits


@pytest.mark.parametrize("strength", [1.0, 0.5, -0.5])
def test_peft_conv_dora_merges_like_peft(strength):
    torch.manual_seed(0)
    base = TwoConvs(8, 12)
    originals = {n: m.weight.detach().clone() for n, m in base.named_children()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["square", "wide"], use_dora=True,
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # a trained magnitude, not ||W||
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    state = get_peft_model_state_dict(model)
    assert any(t.ndim == 4 and t.shape[0] == 1 for k, t in state.items() if "magnitude" in k)
    adapters = load_file({k: v.clone() for k, v in state.items()}, metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    merged = model.merge_and_unload()
    assert set(adapters) == {"base_model.model.square", "base_model.model.wide"}
    for name in ("square", "wide"):
        adapter = adapters[f"base_model.model.{name}"]
        assert adapter.dora_axis == "out"
        ours = adapter.merge(originals[name].clone(), strength)
        want = originals[name] + strength * (getattr(merged, name).weight.detach() - originals[name])
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
