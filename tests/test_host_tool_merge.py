"""`merge --base`: adapters baked into a checkpoint load in the host with the weights our loader
merges, and the checkpoint name map agrees with the host's own key maps.

Oracles: the host's LoRA key maps (`comfy.lora.model_lora_keys_unet/clip`, which know every name
style of SD1.5 and SDXL), the host's checkpoint loader for the baked file, our LycorisLoader merge
(`apply_lycoris`, chained once per file) on the original checkpoint, and core ComfyUI's LoRA
loader for a plain LoRA.
"""
from __future__ import annotations

import os

import pytest
import torch

from host import dit
from host.adapters import AdapterSet, Case, build_case, distinct_unet_sites, SITES
from host.helpers import apply, load, pack_module, root_of, unload_all, weights

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")

# stacked on the same UNet layers, in this order, with these strengths
STACKED = ((Case("lokr"), 1.0), (Case("loha"), -0.5), (Case("lora", (("dora", "out"),)), 0.7),
           (Case("diag-oft"), 1.0))
PLAIN_LORA_STRENGTH = 0.8
BLOCKS = "IN01=0.5, BASE=1.5"
UNTOUCHED = "diffusion_model.output_blocks.11.1.proj_out.weight"  # no adapter targets it
UNET_SITES = {k: v for k, v in SITES.items() if not k.startswith("te_")}


def _checkpoint_key(host_key: str) -> str:
    """The single-file checkpoint key of a host state-dict key (SD1.5)."""
    if host_key.startswith("clip_l."):
        return "cond_stage_model." + host_key[len("clip_l."):]
    return "model." + host_key


def _names(model, clip=None) -> dict:
    import comfy.lora

    out = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        out.update(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}))
    return out


def test_every_sd15_name_the_host_knows_resolves_to_its_checkpoint_key(sd15, sd15_checkpoint):
    from lycoris_core.checkpoint_names import CheckpointNames
    from lycoris_core.io import read_header

    header, _ = read_header(sd15_checkpoint)
    names = CheckpointNames.from_shapes({k: tuple(v["shape"]) for k, v in header.items()})
    checked = 0
    for name, value in _names(sd15[0], sd15[1]).items():
        if not isinstance(value, str) or not value.endswith(".weight") or _checkpoint_key(value) not in header:
            continue  # the host maps every resnet's shortcut name, present or not
        target = names.resolve(name)
        assert target is not None, name
        assert (target.key, target.offset) == (_checkpoint_key(value), None), name
        checked += 1
    assert checked > 2000


def test_every_sdxl_unet_name_the_host_knows_resolves_to_its_key():
    """A bare SDXL UNet file (no prefix): kohya LDM and diffusers names, `unet.` diffusers paths."""
    from lycoris_core.checkpoint_names import CheckpointNames

    model = dit.load("sdxl")
    sd = model.model.diffusion_model.state_dict()
    names = CheckpointNames.from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    checked = 0
    for name, value in _names(model).items():
        if isinstance(value, str) and value[len("diffusion_model."):] in sd and value.endswith(".weight"):
            target = names.resolve(name)
            assert target is not None and target.key == value[len("diffusion_model."):], name
            checked += 1
    assert checked > 500


def _ldm_named(files: AdapterSet) -> AdapterSet:
    """The same modules under ComfyUI's own names (`diffusion_model.input_blocks.1.1.proj_in`)."""
    out = AdapterSet()
    for name, key in files.targets.items():
        module = {k[len(name) + 1:]: v for k, v in files.tensors.items() if k.startswith(name + ".")}
        out.add(key[: -len(".weight")], key, module)
    return out


@pytest.fixture(scope="module")
def baked(sd15, sd15_checkpoint, tmp_path_factory):
    """Five adapter files baked into the checkpoint through the command line (fp16, as stored)."""
    from lycoris_core.__main__ import main

    model, clip, _ = sd15
    folder = tmp_path_factory.mktemp("bake")
    sites = {**distinct_unet_sites(model, 2)[1], **{k: v for k, v in SITES.items() if k.startswith("te_")}}
    files = [(build_case(Case("lora"), model, clip, sites=sites, seed=1), PLAIN_LORA_STRENGTH)]
    for i, (case, strength) in enumerate(STACKED):
        made = build_case(case, model, None, sites=UNET_SITES, seed=2 + i)
        files.append((_ldm_named(made) if case.algo == "loha" else made, strength))
    args = ["merge", "--base", sd15_checkpoint, "--blocks", BLOCKS, "--quiet"]
    for i, (made, strength) in enumerate(files):
        from safetensors.torch import save_file

        path = folder / f"adapter{i}.safetensors"
        save_file(made.tensors, str(path))
        args += ["--adapter", f"{path}:{strength}"]
    out = folder / "baked.safetensors"
    assert main(args + ["--out", str(out)]) == 0
    return out, files


@pytest.fixture(scope="module")
def baked_weights(baked):
    """The patched keys' weights of the baked file as the host's checkpoint loader gives them."""
    import folder_paths
    import nodes

    out, files = baked
    folder_paths.add_model_folder_path("checkpoints", str(out.parent))
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(out.name)
    load(model, clip.patcher)
    keys = {k for made, _ in files for k in made.targets.values()} | {UNTOUCHED}
    got = {k: weights(root_of(k, model, clip)[1], [k])[k].float() for k in keys}
    unload_all()
    return got


def test_baked_checkpoint_loads_in_the_host_with_our_loaders_weights(sd15, baked, baked_weights, originals):
    from lycoris_core import load_file
    from lycoris_core.blocks import parse_spec

    out, files = baked
    model, clip, _ = sd15
    chained_model, chained_clip = model, clip
    for made, strength in files:
        chained_model, chained_clip, report = apply(chained_model, chained_clip, load_file(made.tensors),
                                                    strength, strength, "merge", parse_spec(BLOCKS))
        assert "UNMATCHED" not in report
    keys = sorted({k for made, _ in files for k in made.targets.values()})
    load(chained_model, chained_clip.patcher)
    ours = {k: weights(root_of(k, chained_model, chained_clip)[1], [k])[k] for k in keys}
    unload_all()
    for key in keys:
        got = baked_weights[key]
        want = ours[key].float()
        assert not torch.equal(want, originals[key].float()), f"{key} was not patched"
        # the file stores fp16: ours rounded once; CLIP merges in the host round per stacked loader
        assert torch.allclose(got, want.half().float(), rtol=2e-3, atol=2e-5), key
        if key.startswith("diffusion_model."):
            assert torch.equal(got, want.half().float()), key
    # a tensor no adapter touches is copied bit for bit
    assert torch.equal(baked_weights[UNTOUCHED].half(), originals[UNTOUCHED].half())


def test_plain_lora_baked_equals_core_comfyuis_lora_loader(sd15, baked, baked_weights):
    import comfy.sd

    out, files = baked
    lora, strength = files[0]
    model, clip, _ = sd15
    # the LoRA's UNet sites sit outside IN01 (multiplier 1); BASE=1.5 for the text encoder
    core_model, core_clip = comfy.sd.load_lora_for_models(model, clip, lora.tensors, strength, strength * 1.5)
    load(core_model, core_clip.patcher)
    core = {k: weights(root_of(k, core_model, core_clip)[1], [k])[k] for k in lora.targets.values()}
    unload_all()
    for key in lora.targets.values():
        got = baked_weights[key]
        assert torch.allclose(got, core[key].float().half().float(), rtol=2e-3, atol=2e-5), key


def test_baked_file_keeps_the_checkpoints_metadata_and_dtypes(sd15_checkpoint, baked):
    from lycoris_core.io import read_header

    header, metadata = read_header(str(baked[0]))
    orig_header, orig_metadata = read_header(sd15_checkpoint)
    assert set(header) == set(orig_header)
    assert all(header[k]["dtype"] == orig_header[k]["dtype"] and header[k]["shape"] == orig_header[k]["shape"]
               for k in header)
    assert {k: metadata[k] for k in orig_metadata} == orig_metadata
    assert "lycoris_baked" in metadata
    assert os.path.getsize(baked[0]) >= os.path.getsize(sd15_checkpoint)


def test_bake_node_writes_the_clis_checkpoint_and_it_equals_our_loader_on_flux(lycoris_pack, loras_dir, tmp_path):
    """The node on a tiny Flux file (a bare DiT checkpoint, native names) with a LoKr and a LoRA in
    kohya style: the written tensors equal the command line's and our loader's merge."""
    import folder_paths
    from safetensors.torch import load_file as read_safetensors
    from safetensors.torch import save_file

    from lycoris_core import REGISTRY, LayerSpec, load_file
    from lycoris_core.__main__ import main

    model = dit.load("flux")
    sd = {k: v.contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    save_file(sd, str(ckpt_dir / "flux_tiny.safetensors"))
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir))
    g = torch.Generator().manual_seed(5)
    files = []
    for i, algo in enumerate(("lokr", "lora")):
        tensors = {}
        for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                    "final_layer.adaLN_modulation.1.weight"):
            adapter = REGISTRY[algo].create(LayerSpec("linear", tuple(sd[key].shape)), rank=4)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in adapter.export().items()})
        save_file(tensors, str(loras_dir / f"flux_{algo}.safetensors"))
        files.append(f"flux_{algo}.safetensors")
    node = pack_module("nodes.bake").BakeLycoris()
    output = tmp_path / "output"
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(output))
    try:
        result = node.bake("flux_tiny.safetensors", lycoris_name_1=files[0], strength_1=0.7,
                           lycoris_name_2=files[1], strength_2=-0.4, lycoris_name_3="(none)", strength_3=1.0,
                           dtype="as stored", filename_prefix="checkpoints/baked")
    finally:
        folder_paths.set_output_directory(previous)
    report = result["result"][0]
    assert "UNMATCHED" not in report and "6 modules merged" in report
    written = next((output / "checkpoints").glob("baked_*.safetensors"))
    by_cli = tmp_path / "cli.safetensors"
    assert main(["merge", "--base", str(ckpt_dir / "flux_tiny.safetensors"), "--adapter",
                 f"{loras_dir / files[0]}:0.7", "--adapter", f"{loras_dir / files[1]}:-0.4",
                 "--out", str(by_cli), "--quiet"]) == 0
    node_sd, cli_sd = read_safetensors(str(written)), read_safetensors(str(by_cli))
    assert node_sd.keys() == cli_sd.keys() and all(torch.equal(node_sd[k], cli_sd[k]) for k in node_sd)

    chained = model
    for name, strength in zip(files, (0.7, -0.4)):
        chained, _, report = apply(chained, None, load_file(str(loras_dir / name)), strength, 0.0, "merge")
    load(chained)
    ours = chained.model.diffusion_model.state_dict()
    changed = [k for k in sd if not torch.equal(node_sd[k], sd[k])]
    assert len(changed) == 3
    assert all(torch.allclose(node_sd[k], ours[k].float(), rtol=1e-6, atol=1e-7) for k in sd)
    unload_all()
