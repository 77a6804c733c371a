"""LyCORIS Train and Save LyCORIS inside a real ComfyUI, on a random SD1.5 checkpoint loaded and
trained under the host's inference mode, through the host's own sampling objects.

To keep the steps cheap (2 shared CPU cores) the adapters sit on the last transformer block of the
UNet (backward stops there) and the latents are 8x8; a "fixed" objective repeats one batch, noise
and noise level every step, so the loss is a deterministic, learnable target.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings

import pytest
import torch

from lycoris_core.train import trainable_algorithms

# every registered algorithm that can be trained; DyLoRA (a LoRA trained in nested blocks) has its
# own host tests on the tiny SDXL (test_host_train_dylora.py), which cost a tenth of these
ALGOS = [a for a in trainable_algorithms() if a != "dylora"]
LATE_BLOCK = "up_blocks_3_attentions_2"  # SD1.5 output_blocks.11.1 in kohya (diffusers) names
LATE_PATH = "diffusion_model.output_blocks.11.1."
STEPS = 6
LR = {"diag-oft": 3e-2, "boft": 3e-2, "ia3": 3e-2, "norm": 3e-2}
RANK = {"boft": 10}  # BOFT blocks must split 320 = 10 * 2^5 channels
CORE_LOADS = {"lora", "loha", "lokr", "glora", "diag-oft", "boft", "full", "norm"}  # not (IA)^3


def plot_module():
    """nodes/loss_plot.py needs only PIL: loaded by path, so it is tested without the host too."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nodes", "loss_plot.py")
    spec = importlib.util.spec_from_file_location("lycoris_loss_plot_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("losses", [[1.0, 0.5, 0.25], [0.3] * 5, [0.7], [], [1.0, float("nan"), 0.2]])
def test_loss_plot_handles_flat_single_empty_and_nan(losses):
    img = plot_module().draw_loss(losses, 320, 200)
    assert img.size == (320, 200) and img.mode == "RGB"
    assert len(set(img.getdata())) > 2  # axes and text at least


# ----- host fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def S(lycoris_pack):
    from comfyui_lycoris_under_test.nodes import save

    return save


@pytest.fixture(scope="module")
def host_model(sd15_checkpoint):
    """(MODEL, CONDITIONING, LATENT) made by the host's nodes under inference mode, as in a prompt.
    A private load: training replaces this model's inference-mode parameters with normal copies."""
    import nodes

    with torch.inference_mode():
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(sd15_checkpoint))
        cond = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
        other = nodes.CLIPTextEncode().encode(clip, "a watercolour painting of a lighthouse, " * 12)[0]
        latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    return model, cond, other, latent


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def train(T, host_model, algorithm="lora", steps=STEPS, **kw):
    model, cond, _, latent = host_model
    args = dict(model=model, latents=latent, conditioning=cond, algorithm=algorithm, preset="custom",
                rank=RANK.get(algorithm, 4), alpha=4.0, conv_rank=4, conv_alpha=4.0, steps=steps, batch_size=1,
                learning_rate=LR.get(algorithm, 1e-2), optimizer="AdamW", lr_schedule="constant",
                warmup_steps=0, seed=0, gradient_checkpointing=False, training_dtype="auto",
                include_regex=LATE_BLOCK)
    args.update(kw)
    with torch.inference_mode():
        return T.LycorisTrain().train(**args)


class Frozen:
    """A stand-in trainer that only evaluates the loss (for reference losses)."""

    lr = 0.0

    def step(self, loss_fn):
        with torch.no_grad():
            return float(loss_fn())


def reference_loss(T, host_model, pairs=()):
    """The fixed objective's loss of the model with these (module, adapter) pairs attached."""
    model, cond, _, latent = host_model
    from comfyui_lycoris_under_test.nodes import train_loop as loop
    from lycoris_core.train import wrapper_weights_kept

    with wrapper_weights_kept(model.model), torch.inference_mode(False):
        mp = model.clone()
        return loop.run_training(mp, latent["samples"].clone(), loop.thawed(cond), list(pairs), Frozen(),
                                 steps=1, batch_size=1, seed=0, regularizer=None,
                                 gradient_checkpointing=False).losses[0]


def late_weights(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items() if k.startswith(LATE_PATH)}


# ----- tests ------------------------------------------------------------------------------------
def test_nodes_are_registered(lycoris_pack, T):
    from comfyui_lycoris_under_test import nodes as pack_nodes

    assert {"LycorisTrain", "SaveLycoris"} <= set(pack_nodes.NODE_CLASS_MAPPINGS)
    inputs = T.LycorisTrain.INPUT_TYPES()
    algos = inputs["required"]["algorithm"][0]
    assert set(algos) >= {"lora", "loha", "lokr", "ia3", "glora", "diag-oft", "boft", "full", "norm"}
    assert set(inputs["required"]["preset"][0]) >= {"full", "attn-mlp", "attn-only", "unet-transformer-only",
                                                      "unet-convblock-only", "custom"}


def test_kohya_names_come_from_the_host_key_map(T, host_model):
    names = T.module_names(host_model[0], "sd_v1")
    assert names["input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert names["output_blocks.11.1.proj_out"] == "lora_unet_up_blocks_3_attentions_2_proj_out"
    native = T.module_names(host_model[0], "sdxl_base_v1-0")
    assert native["input_blocks.1.1.proj_in"] == "lora_unet_input_blocks_1_1_proj_in"
    assert T.base_model_hint(host_model[0]) == "sd_v1"


@pytest.mark.parametrize("algorithm", ALGOS)
def test_every_algorithm_trains_in_the_host(T, host_model, fixed_batches, algorithm):
    model = host_model[0]
    before = late_weights(model)
    base_loss = reference_loss(T, host_model)
    trained, lycoris, loss, image = train(T, host_model, algorithm)
    losses = loss["loss"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(base_loss, rel=1e-4)  # dW = 0 at step 0
    assert losses[-1] < 0.9 * losses[0], losses
    after = late_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # base weights untouched
    assert lycoris and all(n.startswith("lora_unet_" + LATE_BLOCK) for n in lycoris)
    assert all(not p.requires_grad and p.device.type == "cpu" for a in lycoris.values() for p in a.parameters())
    assert trained is not model and image.shape[0] == 1 and image.shape[-1] == 3
    meta = lycoris.metadata
    assert json.loads(meta["ss_network_args"])["algo"] == algorithm
    assert meta["ss_steps"] == str(STEPS) and meta["ss_base_model_version"] == "sd_v1"


@pytest.mark.parametrize("dora", ["output axis", "input axis"])
def test_dora_on_a_scaled_fp8_base_starts_from_the_true_weight(T, host_model, fixed_batches, dora):
    """DoRA's magnitude and norms come from the weight the layer computes with (stored values x
    scale): dW = 0 at step 0 and the fp8 base is untouched."""
    from host.helpers import is_fp8_storage, scaled_fp8_unet, stored_bytes

    with torch.inference_mode():
        fp8_model = scaled_fp8_unet(host_model[0])
    fp8_host = (fp8_model,) + tuple(host_model[1:])
    stored = {n: m.weight for n, m in fp8_model.model.named_modules()
              if n.startswith(LATE_PATH[:-1]) and isinstance(getattr(m, "weight", None), torch.Tensor)
              and is_fp8_storage(m.weight)}
    assert stored
    before = {n: stored_bytes(w) for n, w in stored.items()}
    base_loss = reference_loss(T, fp8_host)
    _, lycoris, loss, _ = train(T, fp8_host, "lora", steps=2, dora=dora)
    assert loss["loss"][0] == pytest.approx(base_loss, rel=1e-4)
    modules = dict(fp8_model.model.named_modules())
    assert all(torch.equal(before[n], stored_bytes(modules[n].weight)) for n in stored)
    assert all("dora_scale" in dict(a.named_parameters()) for a in lycoris.values())


@pytest.mark.parametrize("dora", ["off", "output axis"])
def test_training_on_a_gguf_base(T, host_model, gguf_unet, fixed_batches, dora):
    """A Q8_0 GGUF UNet (ComfyUI-GGUF) trains in bypass: dW = 0 at step 0 (DoRA's magnitude from
    the dequantised weight), the loss falls, and the quantised tensors are never replaced."""
    from host.helpers import module_at

    gguf_host = (gguf_unet,) + tuple(host_model[1:])
    key = LATE_PATH + "transformer_blocks.0.attn1.to_out.0.weight"
    stored = module_at(gguf_unet.model, key).weight
    assert type(stored).__name__ == "GGMLTensor"
    base_loss = reference_loss(T, gguf_host)
    _, lycoris, loss, _ = train(T, gguf_host, "lora", dora=dora)
    losses = loss["loss"]
    assert losses[0] == pytest.approx(base_loss, rel=1e-4)
    assert losses[-1] < 0.9 * losses[0], losses
    assert module_at(gguf_unet.model, key).weight is stored
    assert lycoris and all(("dora_scale" in dict(a.named_parameters())) == (dora != "off")
                           for a in lycoris.values())


def test_every_registered_algorithm_is_in_the_node(T):
    assert T.LycorisTrain.INPUT_TYPES()["required"]["algorithm"][0] == trainable_algorithms()
    assert "dylora" in trainable_algorithms()
    assert set(ALGOS) >= {"lora", "loha", "lokr", "ia3", "glora", "diag-oft", "boft", "full", "norm"}


def test_per_image_captions_are_batched_per_image(T, host_model):
    import comfy.conds
    from comfyui_lycoris_under_test.nodes.train_objective import _batched_cond

    a, b = torch.randn(1, 77, 8), torch.randn(1, 154, 8)
    conds = [{"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(t)}} for t in (a, b)]
    batched = _batched_cond(conds, [1, 0])["model_conds"]["c_crossattn"].cond
    assert batched.shape == (2, 154, 8)
    assert torch.equal(batched[0], b[0]) and torch.equal(batched[1], torch.cat([a[0], a[0]]))
    model, cond, other, latent = host_model
    _, _, loss, _ = train(T, host_model, steps=2, batch_size=2, conditioning=cond + other)
    assert len(loss["loss"]) == 2
    with pytest.raises(ValueError, match="one caption for all or one per image"):
        train(T, host_model, steps=1, conditioning=cond + other + cond)


def core_merge(adapters, model, key_map):
    """ComfyUI core's loader on the saved tensors: {model key: patched fp32 weight}."""
    import comfy.lora

    from comfyui_lycoris_under_test.lycoris_core.save import collect_tensors

    patches = comfy.lora.load_lora(collect_tensors(adapters), key_map, log_missing=False)
    sd = model.model.state_dict()
    out = {}
    for key, patch in patches.items():
        w = sd[key].detach().float().clone()
        out[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], w, key)
    return out


@pytest.mark.parametrize("algorithm", ALGOS)
def test_saved_file_loads_in_our_loader_and_core(T, S, host_model, loras_first, algorithm):
    import comfy.lora

    from comfyui_lycoris_under_test.lycoris_core import load_file

    model = host_model[0]
    _, lycoris, _, _ = train(T, host_model, algorithm, steps=2, captions="cat, photo\ncat, dog")
    with torch.inference_mode():
        name = S.SaveLycoris().save(lycoris, f"trained/{algorithm}", "fp32")["result"][0]
    path = os.path.join(str(loras_first), name)
    assert name == f"trained/{algorithm}_00001_.safetensors" and os.path.isfile(path)
    loaded = load_file(path, strict=True)
    meta = loaded.metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_steps"] == "2"
    assert json.loads(meta["ss_tag_frequency"]) == {"dataset": {"cat": 2, "photo": 1, "dog": 1}}
    assert meta["ss_output_name"] == f"{algorithm}_00001_"
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    ours = {}
    for module, adapter in loaded.items():
        key = key_map[module]
        w = sd[key].detach().float()
        ours[key] = adapter.merge(w, 1.0)
        assert torch.allclose(ours[key], lycoris[module].merge(w, 1.0), atol=1e-6)
    if algorithm not in CORE_LOADS:
        return
    core = core_merge(loaded, model, key_map)
    assert set(core) >= set(ours)
    for key, w in ours.items():
        change = w - sd[key].float()
        assert float((core[key] - w).norm() / change.norm().clamp_min(1e-12)) < 1e-4, key


def test_save_numbers_files_and_never_overwrites(T, S, host_model, loras_first):
    _, lycoris, _, _ = train(T, host_model, steps=1)
    first = S.SaveLycoris().save(lycoris, "numbered/x", "fp16")["result"][0]
    second = S.SaveLycoris().save(lycoris, "numbered/x", "bf16")["result"][0]
    assert (first, second) == ("numbered/x_00001_.safetensors", "numbered/x_00002_.safetensors")
    with pytest.raises(ValueError, match="leaves the loras folder"):
        S.SaveLycoris().save(lycoris, "../escape", "fp16")


@pytest.mark.parametrize("source", ["file", "value"])
def test_resume_continues_from_the_saved_adapter(T, S, host_model, loras_first, fixed_batches, source):
    from comfyui_lycoris_under_test.lycoris_core import load_file

    model = host_model[0]
    _, first, _, _ = train(T, host_model, "lokr", steps=3)
    with torch.inference_mode():
        name = S.SaveLycoris().save(first, f"resume/{source}", "fp32")["result"][0]
    saved = load_file(os.path.join(str(loras_first), name))
    modules = T.resume_lookup(model, list(saved))
    assert set(modules) == set(saved)
    expected = reference_loss(T, host_model, [(modules[n], a) for n, a in saved.items()])
    kw = {"resume_file": name} if source == "file" else {"resume_lycoris": saved}
    _, second, loss, _ = train(T, host_model, "lora", steps=2, rank=32, **kw)
    assert loss["loss"][0] == pytest.approx(expected, rel=1e-4)  # first step = the saved adapter
    assert set(second) == set(saved) and all(a.algo == "lokr" for a in second.values())
    assert second.metadata["ss_steps"] == "5"
    assert not any(p.requires_grad for a in saved.values() for p in a.parameters())  # input untouched


def test_interrupt_keeps_what_was_trained(T, host_model, monkeypatch):
    import comfy.model_management as mm

    from comfyui_lycoris_under_test.lycoris_core.train import Trainer

    original = Trainer.step

    def step(self, loss_fn):
        value = original(self, loss_fn)
        if self.step_count == 2:
            mm.interrupt_current_processing(True)
        return value

    monkeypatch.setattr(Trainer, "step", step)
    token = T.LycorisTrain.IS_CHANGED()
    trained, lycoris, loss, _ = train(T, host_model, steps=5)
    assert len(loss["loss"]) == 2 and lycoris.metadata["ss_steps"] == "2"
    assert "interrupted after 2 steps" in lycoris.metadata["ss_training_comment"]
    assert not mm.processing_interrupted()
    assert T.LycorisTrain.IS_CHANGED() != token  # the partial result is not reused from the cache
    assert all(float(a.up.abs().sum()) > 0 for a in lycoris.values())  # trained (up starts at 0)


def test_checkpointing_dropouts_schedule_and_bf16(T, host_model, fixed_batches):
    _, lycoris, loss, _ = train(T, host_model, "lora", steps=3, gradient_checkpointing=True,
                                dropout=0.1, rank_dropout=0.1, module_dropout=0.1, lr_schedule="cosine",
                                warmup_steps=1, optimizer="SGD", training_dtype="bf16", dora="output axis")
    assert len(loss["loss"]) == 3 and all(math.isfinite(v) for v in loss["loss"])
    assert all(a.dora_scale is not None for a in lycoris.values())
    args = json.loads(lycoris.metadata["ss_network_args"])
    assert args["dropout"] == "0.1" and args["dora"] == "out" and lycoris.metadata["ss_mixed_precision"] == "bf16"


@pytest.mark.parametrize("host_has_flag", [True, False], ids=["flag", "no-flag"])
def test_the_hosts_training_flag_is_set_while_training_only(T, host_model, monkeypatch, host_has_flag):
    """Newer hosts read `comfy.model_management.in_training` to leave their inference-only kernels;
    on a host without it nothing is added. The flag is read inside the loss, where those kernels run."""
    import comfy.model_management as mm

    from comfyui_lycoris_under_test.lycoris_core.train import Trainer

    had = hasattr(mm, "in_training")
    if host_has_flag:
        monkeypatch.setattr(mm, "in_training", False, raising=False)
    elif had:
        monkeypatch.delattr(mm, "in_training")
    seen = []
    original = Trainer.step

    def step(self, loss_fn):
        seen.append(getattr(mm, "in_training", None))
        return original(self, loss_fn)

    monkeypatch.setattr(Trainer, "step", step)
    train(T, host_model, steps=2)
    if host_has_flag:
        assert seen == [True, True] and mm.in_training is False
    else:
        assert seen == [None, None] and not hasattr(mm, "in_training")
