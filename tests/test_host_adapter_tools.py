"""`extract` and `resize` inside a real ComfyUI: an adapter extracted from two SD1.5 checkpoints
loads through our loader and through core ComfyUI's LoraLoader, and both patch base + delta.

Oracles: the known low-rank delta added to the tuned checkpoint, core's LoraLoader node (its own
key maps for `lora_unet_`/`lora_te_` names), and each other.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from host.helpers import apply, load, rel_err, root_of, unload_all, weights

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")

RANK = 4
# checkpoint key -> host state-dict key: a Linear, a 1x1 conv, a 3x3 conv, a CLIP Linear
CHANGED = {
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": "diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
}
UNCHANGED = ("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias",
             "model.diffusion_model.input_blocks.1.1.proj_in.bias")


@pytest.fixture(scope="module")
def checkpoint_pair(sd15_checkpoint, tmp_path_factory):
    """(base file, tuned file, deltas): the changed and a few unchanged keys of the test checkpoint
    (fp16), and the same keys with an exact rank-4 delta added (fp32, so the delta is exact)."""
    g = torch.Generator().manual_seed(11)
    folder = tmp_path_factory.mktemp("extract")
    with safe_open(sd15_checkpoint, "pt") as f:
        base = {k: f.get_tensor(k) for k in (*CHANGED, *UNCHANGED)}
    tuned = {k: v.float() for k, v in base.items()}
    deltas = {}
    for key in CHANGED:
        w = base[key].float()
        rows, cols = w.shape[0], math.prod(w.shape[1:])
        d = (torch.randn(rows, RANK, generator=g) @ torch.randn(RANK, cols, generator=g)).reshape(w.shape)
        d *= 0.2 * w.norm() / d.norm()
        tuned[key] = w + d
        deltas[key] = tuned[key] - w
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors", deltas


@pytest.fixture(scope="module")
def extracted(checkpoint_pair, loras_dir):
    from lycoris_core.__main__ import main

    base, tuned, _ = checkpoint_pair
    out = loras_dir / "extracted_lycoris.safetensors"
    assert main(["extract", "--base", str(base), "--tuned", str(tuned), "--out", str(out),
                 "--algo", "locon", "--rank", str(RANK), "--dtype", "fp32", "--quiet",
                 "--device", "cpu"]) == 0
    return out


def _patched(model, clip) -> dict[str, torch.Tensor]:
    load(model, clip.patcher)
    out = {}
    for host_key in CHANGED.values():
        out.update(weights(root_of(host_key, model, clip)[1], [host_key]))
    unload_all()
    return {k: v.float() for k, v in out.items()}


def _tolerance(weight: torch.Tensor) -> float:
    """Relative error of the weight change allowed: fp32 weights, or fp16 rounding of W + dW."""
    return 1e-4 if weight.dtype == torch.float32 else 3e-3


def test_extracted_file_patches_base_plus_delta_in_our_loader_and_core(sd15, originals, extracted,
                                                                       checkpoint_pair):
    import nodes

    from lycoris_core import load_file

    model, clip, _ = sd15
    _, _, deltas = checkpoint_pair
    adapters = load_file(str(extracted))
    assert len(adapters) == len(CHANGED)
    ours_model, ours_clip, report = apply(model, clip, adapters, 1.0, 1.0, "merge")
    assert "UNMATCHED" not in report
    ours = _patched(ours_model, ours_clip)
    core_model, core_clip = nodes.LoraLoader().load_lora(model, clip, extracted.name, 1.0, 1.0)
    core = _patched(core_model, core_clip)
    for ckpt_key, host_key in CHANGED.items():
        w0 = originals[host_key]
        want = deltas[ckpt_key].reshape(w0.shape)
        tol = _tolerance(w0)
        assert rel_err(ours[host_key] - w0.float(), want) < tol, host_key
        assert rel_err(core[host_key] - w0.float(), want) < tol, host_key
        assert rel_err(ours[host_key] - w0.float(), core[host_key] - w0.float()) < tol, host_key


def test_resized_file_loads_in_core_with_the_best_approximation(sd15, originals, extracted, loras_dir,
                                                                checkpoint_pair):
    import nodes

    from lycoris_core.__main__ import main

    model, clip, _ = sd15
    _, _, deltas = checkpoint_pair
    out = loras_dir / "resized_lycoris.safetensors"
    assert main(["resize", str(extracted), "--out", str(out), "--rank", "2", "--quiet",
                 "--device", "cpu"]) == 0
    core = _patched(*nodes.LoraLoader().load_lora(model, clip, out.name, 1.0, 1.0))
    ours = _patched(*apply(model, clip, str(out), 1.0, 1.0, "merge")[:2])
    for ckpt_key, host_key in CHANGED.items():
        w0 = originals[host_key]
        d = deltas[ckpt_key].reshape(w0.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = ((u[:, :2] * s[:2]) @ vh[:2]).reshape(w0.shape)
        tol = 10 * _tolerance(w0)  # fp16 factors
        assert rel_err(core[host_key] - w0.float(), best) < tol, host_key
        assert rel_err(ours[host_key] - w0.float(), best) < tol, host_key


@pytest.fixture
def output_dir(tmp_path):
    """The host's output folder pointed at a fresh folder for one test."""
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(before)


def test_extract_node_writes_the_difference_to_the_output_folder(checkpoint_pair, output_dir):
    import folder_paths

    from host.helpers import pack_module
    from lycoris_core import load_file

    base, tuned, deltas = checkpoint_pair
    folder_paths.add_model_folder_path("checkpoints", str(base.parent))
    node = pack_module("nodes.adapter_tools").ExtractLycoris()
    result = node.extract(base.name, tuned.name, algo="locon", rank_rule="fixed", rank=RANK,
                          solver="randomized", dtype="fp32", filename_prefix="loras/extracted")
    report = result["result"][0]
    written = list(output_dir.glob("loras/extracted_*_.safetensors"))
    assert len(written) == 1 and str(written[0]) in report and "4 modules extracted" in report
    adapters = load_file(str(written[0]))
    from lycoris_core.tools.extract import module_name

    for key, d in deltas.items():
        got = adapters[module_name(key)[0]].merge(torch.zeros(d.shape))
        assert rel_err(got, d) < 1e-4, key


def test_resize_node_writes_the_new_rank_to_the_output_folder(extracted, output_dir):
    from host.helpers import pack_module
    from lycoris_core import load_file

    node = pack_module("nodes.adapter_tools").ResizeLycoris()
    result = node.resize(extracted.name, rank_rule="sv_fro", rank=3, value=0.999,
                         filename_prefix="resized")
    written = list(output_dir.glob("resized_*_.safetensors"))
    assert len(written) == 1 and "4 modules resized" in result["result"][0]
    src, new = load_file(str(extracted)), load_file(str(written[0]))
    assert set(new) == set(src) and all(a.rank == 3 for a in new.values())  # the cap
    assert {t for k, t in new.dtypes.items() if k.endswith("up.weight")} == {"F32"}  # as stored
