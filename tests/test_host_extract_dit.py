"""`extract` on DiT checkpoints: two bare diffusion-model files of a tiny Flux, Qwen-Image and Wan
(the layout their releases ship, no `model.diffusion_model.` prefix) give a LoRA that our loader
and core ComfyUI's LoraLoader both apply as base + the known delta.

Oracles: the exact rank-4 delta added to the tuned file, and core's LoraLoader (its own key map).
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from host import dit
from host.helpers import apply, load, rel_err, unload_all, weights

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")

RANK = 4
CHANGED = 3  # Linear weights given a delta per family: the first, middle and last 2-D weights


def _changed_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    linear = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2 and min(v.shape) > RANK]
    return [linear[0], linear[len(linear) // 2], linear[-1]]


@pytest.fixture(scope="module", params=["flux", "qwen_image", "wan21"])
def family_pair(request, tmp_path_factory, loras_dir):
    """(family, extracted file name, {diffusion key: delta}) for two bare checkpoints of the family."""
    from lycoris_core.__main__ import main

    family = request.param
    base = dit.state_dict(family)
    tuned = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(5)
    deltas = {}
    for key in _changed_keys(base):
        w = base[key].float()
        rows, cols = w.shape[0], math.prod(w.shape[1:])
        d = torch.randn(rows, RANK, generator=g) @ torch.randn(RANK, cols, generator=g)
        d = (d * (0.2 * w.norm() / d.norm())).reshape(w.shape)
        tuned[key] = w + d
        deltas[key] = d
    folder = tmp_path_factory.mktemp(f"extract_{family}")
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    name = f"extracted_{family}.safetensors"
    assert main(["extract", "--base", str(folder / "base.safetensors"), "--tuned",
                 str(folder / "tuned.safetensors"), "--out", str(loras_dir / name), "--rank", str(RANK),
                 "--dtype", "fp32", "--quiet", "--device", "cpu"]) == 0
    return family, name, deltas


def _patched(model, keys) -> dict[str, torch.Tensor]:
    load(model)
    out = weights(model.model, keys)
    unload_all()
    return {k: v.float() for k, v in out.items()}


def test_extracted_dit_file_patches_base_plus_delta_in_our_loader_and_core(family_pair, loras_dir):
    import nodes

    from lycoris_core import load_file

    family, name, deltas = family_pair
    adapters = load_file(str(loras_dir / name))
    assert len(adapters) == len(deltas), sorted(adapters)
    model = dit.load(family)
    keys = [f"diffusion_model.{k}" for k in deltas]
    base = weights(model.model, keys)
    ours_model, _, report = apply(model, None, adapters, 1.0, 0.0, "merge")
    assert "UNMATCHED" not in report
    ours = _patched(ours_model, keys)
    core_model = nodes.LoraLoader().load_lora(model, None, name, 1.0, 0.0)[0]
    core = _patched(core_model, keys)
    for key, delta in deltas.items():
        host_key = f"diffusion_model.{key}"
        w0 = base[host_key].float()
        assert rel_err(ours[host_key] - w0, delta) < 1e-4, (family, key)
        assert rel_err(core[host_key] - w0, delta) < 1e-4, (family, key)
