"""Text-encoder training in LyCORIS Train, inside a real ComfyUI, on tiny models built from the
host's own classes: SD1.5 (a lone CLIP-L), SDXL (CLIP-L + CLIP-G) and Flux (CLIP-L + T5), each a
tiny diffusion model (tests/host/dit.py) whose text width fits the tiny text encoders of
tests/host/text_encoders.py.

The captions go through the host's CLIP every step with adapters on its attention/MLP layers and
their own learning rate. Oracles: the host's own CLIPTextEncode (step 0 of a text-encoder run must
see exactly its conditioning), the loss (with the diffusion-model adapters held still by a
negligible learning rate, only the text encoder can lower it), the host's loaders, ours and core's
(the saved file must rebuild the trained CLIP's encoding), and autograd without checkpointing (the
checkpointed encoder must give the same gradients). Runs are shared between tests (`trained`);
a "fixed" objective repeats one batch every step.
"""
from __future__ import annotations

import os

import pytest
import torch

from host.helpers import pack_module
from host.te_training import (CAPTION, LATE_BLOCK, TE_PREFIXES, UNUSED_LAYER, encode, forget_runs, run, te_modules,
                              tiny_host, trained, up)
from host.text_encoders import flux_clip, sdxl_clip

pytestmark = pytest.mark.usefixtures("quiet_warnings")


@pytest.fixture(scope="module", autouse=True)
def _shared_runs(lycoris_pack, one_thread):
    yield
    forget_runs()


def saved_file_encodes_like_the_trained_clip(family: str, result: dict, loras_dir, prefix: str) -> list[str]:
    """Save LyCORIS writes the run's adapters; Load LyCORIS and core's loader, each on the untouched
    CLIP, reproduce the trained CLIP output's encoding (cross-attention and pooled). Returns the keys."""
    import comfy.sd
    from safetensors import safe_open
    from safetensors.torch import load_file

    loaders, save = pack_module("nodes.loaders"), pack_module("nodes.save")
    model, clip, _, _ = tiny_host(family)
    path = save.save_lycoris(result["lycoris"], prefix, torch.float32, root=str(loras_dir))
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    name = os.path.relpath(path, str(loras_dir)).replace(os.sep, "/")
    with torch.inference_mode():
        ours = loaders.LoadLycoris().load(model, clip, name, 1.0, 1.0)["result"][1]
        by_core = comfy.sd.load_lora_for_models(None, clip, load_file(path), 0.0, 1.0)[1]
    want_cond, want_pooled = encode(result["clip"])
    for other in (ours, by_core):
        got_cond, got_pooled = encode(other)
        assert torch.allclose(got_cond, want_cond, atol=1e-4, rtol=1e-4)
        assert torch.allclose(got_pooled, want_pooled, atol=1e-4, rtol=1e-4)
    assert (want_cond - encode(clip)[0]).abs().max() > 1e-3  # the trained adapters change the encoding
    return keys


# ----- SD1.5: a lone CLIP ----------------------------------------------------------------------------
def test_text_encoder_alone_lowers_the_loss(fixed_batches):
    """UNet adapters at a negligible rate: with the text encoder off the loss stays put; with it on
    the loss falls (gradients reach the CLIP adapters through the re-encoded captions), and step 0
    sees exactly the host's CLIPTextEncode conditioning (same loss as the fixed conditioning)."""
    off = trained("unet lr 1e-8, te off", train_text_encoder=False, learning_rate=1e-8, steps=2)
    on = trained("unet lr 1e-8, te 1e-2", learning_rate=1e-8, steps=4)
    off_loss, on_loss = off["loss"]["loss"], on["loss"]["loss"]
    assert on_loss[0] == pytest.approx(off_loss[0], rel=1e-4)
    assert off_loss[-1] == pytest.approx(off_loss[0], rel=1e-3)
    assert on_loss[-1] < 0.95 * on_loss[0], on_loss
    te = te_modules(on["lycoris"])
    assert te and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
    assert {n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 1)[-1] for n in te} >= {"q_proj", "k_proj", "v_proj",
                                                                                "out_proj"}
    assert any(n.endswith("mlp_fc1") for n in te) and any(n.endswith("mlp_fc2") for n in te)
    assert sum(float(up(a).abs().sum()) > 0 for a in te.values()) == len(te)  # every TE adapter moved
    assert on["clip"] is not tiny_host("sd15")[1]
    assert not torch.allclose(encode(on["clip"])[0], encode(tiny_host("sd15")[1])[0], atol=1e-5)
    assert float(on["lycoris"].metadata["ss_text_encoder_lr"]) == 1e-2
    assert on["lycoris"].metadata["ss_network_train_unet_only"] == "False"


def test_text_encoder_lr_zero_keeps_its_adapters_at_init(fixed_batches):
    """A separate optimizer group: lr 0 there leaves every CLIP adapter at dW = 0 while the UNet's
    train, and the returned CLIP encodes exactly like the input."""
    result = trained("te lr 0", text_encoder_lr=0.0, steps=1)
    te = te_modules(result["lycoris"])
    unet = {n: a for n, a in result["lycoris"].items() if n.startswith("lora_unet_")}
    assert te and unet
    assert all(float(up(a).abs().max()) == 0 for a in te.values())
    assert all(float(up(a).abs().max()) > 0 for a in unet.values())
    assert torch.equal(encode(result["clip"])[0], encode(tiny_host("sd15")[1])[0])


def test_saved_file_loads_back_on_the_clip(fixed_batches, loras_dir):
    """Save LyCORIS writes `lora_te_` modules, and Load LyCORIS on the untouched CLIP reproduces
    the trained CLIP output's encoding (cross-attention and pooled), as core's loader does."""
    keys = saved_file_encodes_like_the_trained_clip("sd15", trained("both lr 1e-2", steps=2), loras_dir,
                                                    "te_train/te")
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_" + LATE_BLOCK) for k in keys)


def test_off_by_default_and_refusals(T, fixed_batches):
    model, clip, cond, latent = tiny_host("sd15")
    result = trained("unet lr 1e-8, te off", train_text_encoder=False, learning_rate=1e-8, steps=2)
    assert result["lycoris"] and not te_modules(result["lycoris"]) and result["clip"] is clip
    defaults = T.LycorisTrain.INPUT_TYPES()["optional"]
    assert defaults["train_text_encoder"][1]["default"] is False
    assert T.LycorisTrain.RETURN_TYPES[:4] == ("MODEL", "LYCORIS", "LOSS_MAP", "IMAGE")
    with torch.inference_mode():  # the four-output API of earlier versions still answers
        assert len(T.LycorisTrain().train(model=model, latents=latent, conditioning=cond, algorithm="lora",
                                          preset="custom", rank=4, alpha=4.0, conv_rank=4, conv_alpha=4.0,
                                          steps=1, batch_size=1, learning_rate=1e-3, optimizer="AdamW",
                                          lr_schedule="constant", warmup_steps=0, seed=0,
                                          gradient_checkpointing=False, training_dtype="auto",
                                          include_regex=LATE_BLOCK)) == 4
    with pytest.raises(ValueError, match="needs the clip input"):
        run(clip=None)
    with pytest.raises(ValueError, match="needs the captions input"):
        run(captions="  \n")
    with pytest.raises(ValueError, match="one caption for all or one per image"):
        run(captions="a\nb")


# ----- encoders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen25_7b", "gemma2_2b", "qwen3_4b", "llama"])
def test_llm_text_encoders_are_refused(name):
    from host.text_encoders import llm_clip

    with pytest.raises(ValueError, match="not for LLM encoders"):
        pack_module("nodes.train_text_encoder").check_trainable_text_encoder(llm_clip(name))


def test_multi_encoder_names_follow_kohya():
    """SDXL's pair gets `lora_te1_`/`lora_te2_`, Flux's CLIP-L `lora_te1_` and its T5 `lora_te3_`
    (kohya's sd-scripts prefixes), and both are CLIP/T5, so trainable."""
    TE = pack_module("nodes.train_text_encoder")
    for clip, family in ((sdxl_clip(), "sdxl"), (flux_clip(), "flux")):
        TE.check_trainable_text_encoder(clip)
        names = TE.text_encoder_names(clip)
        built = TE.text_encoder_adapters(clip, "lora", 4, 4.0, {}, "", 0)
        assert {n[:9] for n in built.adapters} == TE_PREFIXES[family]
        assert set(built.adapters) <= set(names.values())


def test_checkpointed_text_encoder_gives_the_same_gradients():
    """With checkpointing the attention and MLP of every CLIP layer and T5 block recompute their
    forward in backward (the modules inside run again), and the adapters' gradients equal those of
    plain autograd (which a finite difference confirms: a checkpoint around a whole layer, whose
    residual add updates activations in place, gives wrong ones)."""
    TE = pack_module("nodes.train_text_encoder")
    core = pack_module("lycoris_core.train")
    clip = flux_clip()
    root = clip.cond_stage_model
    assert [type(m).__name__ for m in TE.encoder_layers(root)] == ["CLIPLayer"] * 3 + ["T5Block"] * 2
    units = TE.checkpoint_units(root)
    assert len(units) == 2 * 3 + 2 * 2  # attention and MLP of each
    built = TE.text_encoder_adapters(clip, "lora", 4, 4.0, {}, "", 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for a in built.adapters.values() for p in a.parameters()):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))  # dW != 0: every factor gets a gradient
    core.autograd_safe(root)
    calls = [0] * len(units)  # forward calls of the modules inside each unit

    def counter(i):
        return lambda *_: calls.__setitem__(i, calls[i] + 1)

    hooks = [m.register_forward_hook(counter(i)) for i, unit in enumerate(units)
             for m in unit.modules() if m is not unit]

    def gradients(checkpointing: bool):
        calls[:] = [0] * len(units)
        encoder = TE.CaptionEncoder(clip, [CAPTION], checkpointing)
        # the host's CLIP layers update their residual in place: saved activations are copied, as
        # the training loop does for such models
        with core.frozen(root), core.attached(built.pairs()), core.activations_copied():
            cond, pooled = encoder.encode(0)
            (cond.square().mean() + pooled.square().mean()).backward()
        out = {f"{n}.{k}": p.grad.clone() for n, a in built.adapters.items() for k, p in a.named_parameters()}
        for a in built.adapters.values():
            a.zero_grad(set_to_none=True)
        return out, list(calls)

    try:
        plain, plain_calls = gradients(False)
        checkpointed, checkpointed_calls = gradients(True)
    finally:
        for h in hooks:
            h.remove()
    assert all(c > p > 0 for c, p in zip(checkpointed_calls, plain_calls)), (checkpointed_calls, plain_calls)
    assert {k[:9] for k in plain} == TE_PREFIXES["flux"]
    for k, v in plain.items():
        assert float(v.abs().max()) > 0, k
        assert torch.allclose(checkpointed[k], v, rtol=1e-5, atol=1e-9), k


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_multi_encoder_training_end_to_end(family, fixed_batches, loras_dir):
    """SDXL (CLIP-L + CLIP-G) and Flux (CLIP-L + T5), text encoders checkpointed: with the
    diffusion-model adapters held still, training the text encoders lowers the loss below the same
    run with text_encoder_lr 0, every encoder gets kohya-named adapters, and the saved file
    rebuilds the trained CLIP's encoding in our loader and core's."""
    kw = dict(learning_rate=1e-8, steps=3, gradient_checkpointing=True)
    still = trained(f"{family} te lr 0", family, text_encoder_lr=0.0, **kw)
    moved = trained(f"{family} te lr 1e-2", family, **kw)
    assert moved["loss"]["loss"][0] == pytest.approx(still["loss"]["loss"][0], rel=1e-5)
    assert moved["loss"]["loss"][-1] < 0.98 * still["loss"]["loss"][-1], (moved["loss"], still["loss"])
    te = te_modules(moved["lycoris"])
    assert {n[:9] for n in te} == TE_PREFIXES[family]
    still_at_init = {n for n, a in te.items() if float(up(a).abs().max()) == 0}
    assert still_at_init == {n for n in te if n.startswith(UNUSED_LAYER.get(family, "-"))}
    keys = saved_file_encodes_like_the_trained_clip(family, moved, loras_dir, f"te_train/{family}")
    assert {k[:9] for k in keys if k.startswith("lora_te")} == TE_PREFIXES[family]
