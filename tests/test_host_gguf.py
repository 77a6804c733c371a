"""GGUF-quantised UNets (city96's ComfyUI-GGUF node pack) inside a real ComfyUI.

The `gguf_unet` fixture writes the test SD1.5 UNet as a GGUF file (Q8_0 Linear weights, F32
elsewhere) and loads it with the pack's own loader, so layers hold its quantised tensor class and
dequantise on every forward; it skips when the pack or its `gguf` package is missing.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lycoris_core import load_file

from host.adapters import Case, build_case
from host.gguf import dense_weight
from host.helpers import apply, load, module_at, module_outputs, rel_err, sample_input, unet_output, unload_all

LINEAR = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"

pytestmark = pytest.mark.usefixtures("quiet_warnings")


def test_the_gguf_unet_holds_quantised_tensors(gguf_unet):
    module = module_at(gguf_unet.model, LINEAR)
    assert type(module.weight).__name__ == "GGMLTensor" and module.weight.dtype == torch.uint8
    assert tuple(module.weight.shape) == (320, 320)


@pytest.mark.parametrize("case", [Case("lora"), Case("lora", (("dora", "out"),)), Case("lokr"),
                                  Case("lora", (("dora", "in"),)), Case("diag-oft")], ids=lambda c: c.id)
@pytest.mark.parametrize("mode", ["auto", "merge"])
def test_gguf_layer_matches_the_merge_of_its_dequantised_weight(gguf_unet, case, mode):
    """auto bypasses the GGUF layer and merge patches it on the fly (the pack applies weight patches
    after dequantising, on every forward); both equal our merge of the dequantised weight."""
    model = gguf_unet
    module = module_at(model.model, LINEAR)
    files = build_case(case, model, None, sites={"linear": LINEAR})
    assert list(files.targets.values()) == [LINEAR]
    strength = 0.8
    unload_all()
    new_model, _, report = apply(model, None, files.tensors, strength, 0.0, mode)
    if mode == "auto":
        assert "1 bypassed" in report and "GGMLTensor storage" in report, report
    load(new_model)
    got = module_outputs(new_model, None, [LINEAR])[LINEAR]
    (adapter,) = load_file(files.tensors).values()
    unload_all()
    dense = dense_weight(module)
    with torch.inference_mode():
        want = F.linear(sample_input(module), adapter.merge(dense, strength), module.bias.float())
        base = F.linear(sample_input(module), dense, module.bias.float())
    assert rel_err(got, base) > 1e-3  # the adapter did something
    assert rel_err(got, want) < 1e-4
    assert type(module.weight).__name__ == "GGMLTensor"  # storage never replaced


def test_gguf_unet_strength_zero_is_the_plain_model(gguf_unet):
    files = build_case(Case("lora", (("dora", "out"),)), gguf_unet, None, sites={"linear": LINEAR})
    plain = unet_output(gguf_unet)
    zero, _, _ = apply(gguf_unet, None, files.tensors, 0.0, 0.0, "auto")
    one, _, _ = apply(gguf_unet, None, files.tensors, 1.0, 0.0, "auto")
    assert torch.equal(unet_output(zero), plain)
    assert rel_err(unet_output(one), plain) > 1e-5
    unload_all()
