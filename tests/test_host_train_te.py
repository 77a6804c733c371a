"""Text-encoder training in LyCORIS Train, inside a real ComfyUI, on the random SD1.5 checkpoint.

The captions go through the host's CLIP every step with adapters on its attention/MLP layers and
their own learning rate. Oracles: the host's own CLIPTextEncode (step 0 of a text-encoder run must
see exactly its conditioning), the loss (with the UNet adapters held still by a negligible learning
rate, only the text encoder can lower it), and the host's loaders through Load LyCORIS (the saved
file must rebuild the trained CLIP's encoding). UNet adapters sit on the last transformer block and
latents are 8x8, as in test_host_train.py; a "fixed" objective repeats one batch every step.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

LATE_BLOCK = "up_blocks_3_attentions_2"
CAPTION = "a photo of a cat"
STEPS = 4


@pytest.fixture(scope="module")
def te_host(sd15_checkpoint):
    """(MODEL, CLIP, CONDITIONING, LATENT) made by the host's nodes under inference mode, as in a
    prompt; a private load, since training makes the weights autograd-safe in place."""
    import nodes

    with torch.inference_mode():
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(sd15_checkpoint))
        cond = nodes.CLIPTextEncode().encode(clip, CAPTION)[0]
        latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    return model, clip, cond, latent


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run(T, te_host, **kw):
    """The node's five outputs (model, lycoris, loss, plot, clip)."""
    model, clip, cond, latent = te_host
    args = dict(model=model, latents=latent, conditioning=cond, algorithm="lora", preset="custom", rank=4,
                alpha=4.0, conv_rank=4, conv_alpha=4.0, steps=STEPS, batch_size=1, learning_rate=1e-2,
                optimizer="AdamW", lr_schedule="constant", warmup_steps=0, seed=0,
                gradient_checkpointing=False, training_dtype="auto", include_regex=LATE_BLOCK,
                clip=clip, captions=CAPTION, train_text_encoder=True, text_encoder_lr=1e-2)
    args.update(kw)
    with torch.inference_mode():
        return T.LycorisTrain().run(**args)


def te_modules(lycoris) -> dict:
    return {n: a for n, a in lycoris.items() if n.startswith("lora_te")}


def up(adapter) -> torch.Tensor:
    return dict(adapter.named_parameters())["lora_up"] if "lora_up" in dict(adapter.named_parameters()) \
        else adapter.export()[next(k for k in adapter.export() if k.endswith("lora_up.weight"))]


def encode(clip, text=CAPTION):
    import nodes

    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, text)[0]
    return cond[0][0].float().clone(), cond[0][1]["pooled_output"].float().clone()


def test_text_encoder_alone_lowers_the_loss(T, te_host, fixed_batches):
    """UNet adapters at a negligible rate: with the text encoder off the loss stays put; with it on
    the loss falls (gradients reach the CLIP adapters through the re-encoded captions), and step 0
    sees exactly the host's CLIPTextEncode conditioning (same loss as the fixed conditioning)."""
    _, off, off_loss, _, _ = run(T, te_host, train_text_encoder=False, learning_rate=1e-8, steps=2)
    _, on, on_loss, _, clip_out = run(T, te_host, text_encoder_lr=1e-3, learning_rate=1e-8, steps=4)
    off_loss, on_loss = off_loss["loss"], on_loss["loss"]
    assert on_loss[0] == pytest.approx(off_loss[0], rel=1e-4)
    assert off_loss[-1] == pytest.approx(off_loss[0], rel=1e-3)
    assert on_loss[-1] < 0.95 * on_loss[0], on_loss
    te = te_modules(on)
    assert te and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
    assert {n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 1)[-1] for n in te} >= {"q_proj", "k_proj", "v_proj",
                                                                                "out_proj"}
    assert any(n.endswith("mlp_fc1") for n in te) and any(n.endswith("mlp_fc2") for n in te)
    assert sum(float(up(a).abs().sum()) > 0 for a in te.values()) == len(te)  # every TE adapter moved
    assert clip_out is not te_host[1]
    assert not torch.allclose(encode(clip_out)[0], encode(te_host[1])[0], atol=1e-5)
    assert float(on.metadata["ss_text_encoder_lr"]) == 1e-3
    assert on.metadata["ss_network_train_unet_only"] == "False"


def test_text_encoder_lr_zero_keeps_its_adapters_at_init(T, te_host, fixed_batches):
    """A separate optimizer group: lr 0 there leaves every CLIP adapter at dW = 0 while the UNet's
    train, and the returned CLIP encodes exactly like the input."""
    _, lycoris, loss, _, clip_out = run(T, te_host, text_encoder_lr=0.0, steps=1)
    te = te_modules(lycoris)
    unet = {n: a for n, a in lycoris.items() if n.startswith("lora_unet_")}
    assert te and unet
    assert all(float(up(a).abs().max()) == 0 for a in te.values())
    assert all(float(up(a).abs().max()) > 0 for a in unet.values())
    assert torch.equal(encode(clip_out)[0], encode(te_host[1])[0])


def test_saved_file_loads_back_on_the_clip(T, te_host, fixed_batches, loras_dir):
    """Save LyCORIS writes `lora_te_` modules, and Load LyCORIS on the untouched CLIP reproduces
    the trained CLIP output's encoding (cross-attention and pooled), as core's loader does."""
    import comfy.sd
    from safetensors import safe_open
    from safetensors.torch import load_file

    from comfyui_lycoris_under_test.nodes import loaders, save

    model, clip, _, _ = te_host
    _, lycoris, _, _, trained_clip = run(T, te_host, steps=2)
    path = save.save_lycoris(lycoris, "te_train/te", torch.float32, root=str(loras_dir))
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_" + LATE_BLOCK) for k in keys)
    name = os.path.relpath(path, str(loras_dir)).replace(os.sep, "/")
    with torch.inference_mode():
        loaded = loaders.LoadLycoris().load(model, clip, name, 1.0, 1.0)["result"][1]
        by_core = comfy.sd.load_lora_for_models(None, clip, load_file(path), 0.0, 1.0)[1]
    want_cond, want_pooled = encode(trained_clip)
    base_cond = encode(clip)[0]
    for other in (loaded, by_core):
        got_cond, got_pooled = encode(other)
        assert torch.allclose(got_cond, want_cond, atol=1e-4, rtol=1e-4)
        assert torch.allclose(got_pooled, want_pooled, atol=1e-4, rtol=1e-4)
    assert (want_cond - base_cond).abs().max() > 1e-3  # the trained adapters change the encoding


def test_off_by_default_and_refusals(T, te_host, fixed_batches):
    model, clip, cond, latent = te_host
    _, lycoris, _, _, clip_out = run(T, te_host, train_text_encoder=False, steps=1)
    assert lycoris and not te_modules(lycoris) and clip_out is clip
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
        run(T, te_host, clip=None)
    with pytest.raises(ValueError, match="needs the captions input"):
        run(T, te_host, captions="  \n")
    with pytest.raises(ValueError, match="one caption for all or one per image"):
        run(T, te_host, captions="a\nb")


@pytest.mark.parametrize("name", ["qwen25_7b", "gemma2_2b", "qwen3_4b", "llama"])
def test_llm_text_encoders_are_refused(T, name):
    from comfyui_lycoris_under_test.nodes import train_text_encoder as TE
    from host.text_encoders import llm_clip

    clip = llm_clip(name)
    with pytest.raises(ValueError, match="not for LLM encoders"):
        TE.check_trainable_text_encoder(clip)


def test_multi_encoder_names_follow_kohya(T):
    """SDXL's pair gets `lora_te1_`/`lora_te2_`, Flux's CLIP-L `lora_te1_` and its T5 `lora_te3_`
    (kohya's sd-scripts prefixes), and both are CLIP/T5, so trainable."""
    from comfyui_lycoris_under_test.nodes import train_text_encoder as TE
    from host.text_encoders import flux_clip, sdxl_clip

    for clip, prefixes in ((sdxl_clip(), {"lora_te1_", "lora_te2_"}), (flux_clip(), {"lora_te1_", "lora_te3_"})):
        TE.check_trainable_text_encoder(clip)
        names = TE.text_encoder_names(clip)
        built = TE.text_encoder_adapters(clip, "lora", 4, 4.0, {}, "", 0)
        assert {n[:9] for n in built.adapters} == prefixes
        assert set(built.adapters) <= set(names.values())
