"""LyCORIS Train's sample previews (sample_every) inside a real ComfyUI, on the tiny SDXL (epsilon)
and Flux (flow matching) models of tests/host/dit.py: previews come every N steps on the node's
progress bar; training is bit-identical with and without them; a preview is what the host's own
KSampler ("euler", "simple", cfg 1, the same noise) gives for the model with the adapter as
trained at that step, with the first caption or the sample_conditioning input; with a VAE they are
decoded as the host's VAEDecode does and saved as PNGs that never replace a file.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from host import dit, dit_inputs
from host.checkpoint import _fill_
from host.helpers import pack_module, rel_err

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded", "one_thread", "models_dropped")
SAMPLE_STEPS = 3
_MODELS: dict = {}


@pytest.fixture(scope="module")
def models_dropped():
    """The cached tiny models are released with the module, not at interpreter exit."""
    yield
    _MODELS.clear()


def tiny(family: str):
    """The tiny `family` model, loaded once per test process (training never changes it)."""
    if family not in _MODELS:
        _MODELS[family] = dit.load(family)
    return _MODELS[family]


def tiny_vae(channels: int):
    """A seeded random TAESD as the host's VAE class loads it (8x upscale, `channels` latents)."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=channels)
    _fill_(taesd, torch.Generator().manual_seed(0))
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


def run(family: str, model=None, **kw):
    """LyCORIS Train's six outputs on the tiny model: LoRA rank 4 on attention/MLP, 8x8 latents."""
    model = model or tiny(family)
    args = dict(model=model, latents=dit_inputs.latents(family, model),
                conditioning=dit_inputs.conditioning(family), algorithm="lora", preset="attn-mlp", rank=4,
                alpha=4.0, conv_rank=0, conv_alpha=1.0, steps=2, batch_size=1, learning_rate=1e-2,
                optimizer="AdamW", lr_schedule="constant", warmup_steps=0, seed=0,
                gradient_checkpointing=False, training_dtype="auto", sample_steps=SAMPLE_STEPS)
    args.update(kw)
    with torch.inference_mode():
        return pack_module("nodes.train").LycorisTrain().run(**args)


@pytest.fixture
def previews(monkeypatch) -> list:
    """The (step, latent) pairs of every run's previews, as the node hands them to the VAE."""
    cls = pack_module("nodes.train_preview").SamplePreviews
    original, kept = cls.images, []

    def images(self, vae):
        kept.append(list(self.latents))
        return original(self, vae)

    monkeypatch.setattr(cls, "images", images)
    return kept


def host_euler(model, family: str, conditioning, seed: int = 0) -> torch.Tensor:
    """The host's own sampling from an empty latent: KSampler "euler"/"simple", cfg 1, noise seeded
    as the previews seed theirs."""
    import comfy.sample

    shape = dit_inputs.latent_shape(family, model)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, SAMPLE_STEPS, 1.0, "euler", "simple", conditioning,
                                   conditioning, torch.zeros(shape), disable_pbar=True, seed=seed).float()


def adapter_tensors(lycoris) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, a in lycoris.items() for k, v in a.export().items()}


def test_node_offers_the_preview_inputs_and_output_last():
    T = pack_module("nodes.train").LycorisTrain
    assert T.RETURN_TYPES[-1] == "IMAGE" and T.RETURN_NAMES[-1] == "samples"
    assert len(T.RETURN_TYPES) == len(T.RETURN_NAMES) == len(T.OUTPUT_TOOLTIPS) == 6
    assert T.RETURN_NAMES[:5] == ("model", "lycoris", "loss", "loss_plot", "clip")
    optional = T.INPUT_TYPES()["optional"]
    assert optional["sample_every"][1]["default"] == 0 and optional["sample_steps"][1]["default"] == 20
    assert optional["vae"][0] == "VAE" and optional["sample_conditioning"][0] == "CONDITIONING"


def test_previews_come_every_n_steps_on_the_progress_bar(previews, monkeypatch):
    import comfy.utils

    shown = []

    def hook(value, total, preview, node_id=None):
        if preview is not None:
            shown.append((value, total, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    out = run("sdxl", steps=5, sample_every=2)
    assert [step for step, _ in previews[0]] == [2, 4]
    assert [(v, t) for v, t, _ in shown] == [(2, 5), (4, 5)]
    kind, image, _ = shown[0][2]
    assert kind == "JPEG" and isinstance(image, Image.Image) and image.size == (8, 8)
    assert tuple(out[5].shape) == (1, 1, 1, 3) and not out[5].any()  # no vae: the placeholder


def test_training_is_bit_identical_with_and_without_previews(previews):
    """Dropouts draw from the global RNG every step: previews between steps must not move it, nor
    change the conds, model options or modes training uses."""
    options = dict(steps=3, dropout=0.1, rank_dropout=0.2, module_dropout=0.1, gradient_checkpointing=True)
    off = run("sdxl", **options)
    on = run("sdxl", sample_every=1, **options)
    assert [step for step, _ in previews[0]] == [1, 2, 3]
    assert off[2]["loss"] == on[2]["loss"]
    a, b = adapter_tensors(off[1]), adapter_tensors(on[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    undated = [{k: v for k, v in r[1].metadata.items() if k != "modelspec.date"} for r in (off, on)]
    assert undated[0] == undated[1]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_preview_is_the_hosts_euler_sampling_with_the_adapter_of_that_step(family, previews):
    """At a zero learning rate the adapter stays at zero: the preview is the base model's sampling.
    Trained, the last step's preview is the host's sampling of the node's trained MODEL (merged
    adapter) and differs from the base model's."""
    cond = dit_inputs.conditioning(family)
    base = host_euler(tiny(family), family, cond)
    run(family, steps=2, sample_every=2, learning_rate=0.0)
    trained = run(family, steps=2, sample_every=2)[0]
    (step, at_zero), = previews[0]
    (_, at_two), = previews[1]
    assert step == 2 and at_zero.shape == base.shape
    assert rel_err(at_zero, base) < 1e-5
    assert rel_err(at_two, host_euler(trained, family, cond)) < 1e-4
    assert rel_err(at_two, base) > 1e-3


def test_sample_conditioning_is_processed_like_the_training_conds(previews):
    """Flux: another prompt for the previews, with the training run's Flux guidance set on it."""
    prompt = dit_inputs.conditioning("flux", seed=7)
    run("flux", steps=1, sample_every=1, learning_rate=0.0, sample_conditioning=prompt, flux_guidance=2.0)
    run("flux", steps=1, sample_every=1, learning_rate=0.0, flux_guidance=2.0)
    (_, custom), = previews[0]
    (_, first), = previews[1]
    guided = [[c, {**extra, "guidance": 2.0}] for c, extra in prompt]
    assert rel_err(custom, host_euler(tiny("flux"), "flux", guided)) < 1e-5
    assert rel_err(custom, first) > 1e-3


def test_with_text_encoder_training_a_preview_uses_the_encoder_as_trained_so_far(previews):
    """Flux with the tiny CLIP-L + T5 of tests/host/text_encoders.py, only the text encoder
    learning: the last preview is the host's sampling of the caption as the node's trained CLIP
    encodes it (CLIPTextEncode), not as the conditioning input holds it."""
    import dataclasses

    import nodes

    from host.text_encoders import flux_clip

    family = dataclasses.replace(dit.FAMILIES["flux"], name="flux_te",
                                 config={**dit.FAMILIES["flux"].config, "vec_in_dim": 64})  # CLIP-L pooled
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dit.FAMILIES, family.name, family)
        model = dit.load(family.name)
    clip, caption = flux_clip(), "a photo of a cat"
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, caption)[0]
    out = run("flux", model=model, conditioning=cond, clip=clip, captions=caption, train_text_encoder=True,
              text_encoder_lr=1e-2, learning_rate=0.0, sample_every=2)
    with torch.inference_mode():
        encoded_now = nodes.CLIPTextEncode().encode(out[4], caption)[0]
    (step, latent), = previews[0]
    assert step == 2
    assert rel_err(latent, host_euler(model, "flux", encoded_now)) < 1e-4
    assert rel_err(latent, host_euler(model, "flux", cond)) > 1e-3


def test_vae_decodes_previews_into_pngs_that_never_replace_a_file(previews, tmp_path, monkeypatch):
    import folder_paths
    import nodes

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    vae = tiny_vae(4)
    os.makedirs(tmp_path / "samples")
    (tmp_path / "samples" / "run_00003_step000002.safetensors").write_bytes(b"an earlier run's checkpoint")
    first = run("sdxl", steps=2, sample_every=1, vae=vae, save_prefix="samples/run")[5]
    names = sorted(os.listdir(tmp_path / "samples"))
    assert names == ["run_00003_step000002.safetensors", "run_00004_sample_step000001.png",
                     "run_00004_sample_step000002.png"]
    with torch.inference_mode():
        decoded = torch.cat([nodes.VAEDecode().decode(vae, {"samples": latent})[0] for _, latent in previews[0]])
    assert first.shape == (2, 64, 64, 3) and torch.equal(first, decoded.float())
    png = np.asarray(Image.open(tmp_path / "samples" / names[2]))
    assert np.array_equal(png, np.clip(255.0 * decoded[1].numpy(), 0, 255).astype(np.uint8))
    before = {n: (tmp_path / "samples" / n).read_bytes() for n in names}
    run("sdxl", steps=2, sample_every=2, vae=vae, save_prefix="samples/run")
    after = sorted(os.listdir(tmp_path / "samples"))
    assert after == names + ["run_00005_sample_step000002.png"]
    assert all((tmp_path / "samples" / n).read_bytes() == data for n, data in before.items())


def test_a_sample_name_taken_during_the_run_moves_to_the_next_run_number(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    cls = pack_module("nodes.train_preview").SamplePreviews
    original = cls.images

    def images(self, vae):  # another run writes this run's first name just before it is saved
        (tmp_path / "s" / f"run_{self.run:05d}_sample_step000001.png").write_bytes(b"taken")
        return original(self, vae)

    monkeypatch.setattr(cls, "images", images)
    os.makedirs(tmp_path / "s")
    run("sdxl", steps=1, sample_every=1, vae=tiny_vae(4), save_prefix="s/run")
    assert sorted(os.listdir(tmp_path / "s")) == ["run_00001_sample_step000001.png",
                                                  "run_00002_sample_step000001.png"]
    assert (tmp_path / "s" / "run_00001_sample_step000001.png").read_bytes() == b"taken"


def test_sample_conditioning_with_a_controlnet_is_refused():
    SamplePreviews = pack_module("nodes.train_preview").SamplePreviews
    prompt = [[torch.zeros(1, 6, 64), {"control": object()}]]
    with pytest.raises(ValueError, match="sample_conditioning entry 0 carries control"):
        SamplePreviews(1, 2, prompt, (1, 4, 8, 8), 0, sample_conditioning=prompt)
