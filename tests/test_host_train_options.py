"""LyCORIS Train's objective and run options inside a real ComfyUI, on the tiny SDXL (epsilon) and
Flux (flow matching, guidance-distilled) models of tests/host/dit.py: min-SNR-gamma weighting by the
model's own prediction type, timestep shift against the host's own Flux schedule, the Flux guidance
the model sees, caption dropout against training on the empty caption, gradient accumulation
against a larger batch, save every N steps and an exact resume from the optimizer state beside the
file, train_norm, Diag-OFT block counts, optional optimizers' install message.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from host import dit_inputs
from host.dit_checks import tiny  # loaded once per process: training never changes it
from host.helpers import pack_module

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")


def run(family: str, model=None, images: int = 1, **kw):
    """LyCORIS Train on the tiny model: LoRA rank 4 on attention/MLP, 8x8 latents, one caption
    per image; returns (MODEL, LYCORIS, loss, plot)."""
    model = model or tiny(family)
    conditioning = [c for i in range(images) for c in dit_inputs.conditioning(family, seed=i)]
    args = dict(model=model, latents=dit_inputs.latents(family, model, batch=images),
                conditioning=conditioning, algorithm="lora", preset="attn-mlp", rank=4, alpha=4.0,
                conv_rank=0, conv_alpha=1.0, steps=1, batch_size=1, learning_rate=1e-3, optimizer="AdamW",
                lr_schedule="constant", warmup_steps=0, seed=0, gradient_checkpointing=False,
                training_dtype="auto")
    args.update(kw)
    with torch.inference_mode():
        return pack_module("nodes.train").LycorisTrain().train(**args)


# ----- objective ---------------------------------------------------------------------------------
def recorded_sigmas(monkeypatch) -> list[torch.Tensor]:
    """Every batch of noise levels the objective draws, in order."""
    objective = pack_module("nodes.train_objective").Objective
    seen = []
    original = objective.sigmas

    def sigmas(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(objective, "sigmas", sigmas)
    return seen


def adapter_params(lycoris) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p.detach().clone() for n, a in lycoris.items() for k, p in a.named_parameters()}


@pytest.mark.parametrize("prediction", ["eps", "v_prediction"])
def test_min_snr_gamma_weights_by_the_models_own_prediction_type(fixed_batches, monkeypatch, prediction):
    """Step 1's loss (before any update) with min-SNR-gamma is the plain loss times the weight of
    the drawn sigma: min(SNR, g)/SNR for epsilon, min(SNR, g)/(SNR + 1) for v, SNR = 1/sigma^2."""
    import comfy_extras.nodes_model_advanced as advanced

    with torch.inference_mode():
        model = advanced.ModelSamplingDiscrete().patch(tiny("sdxl"), prediction, False)[0]
    sigmas = recorded_sigmas(monkeypatch)
    plain = run("sdxl", model)[2]
    assert plain["objective"] == {"eps": "epsilon", "v_prediction": "v-prediction"}[prediction]
    snr = 1.0 / float(sigmas[0][0]) ** 2
    gamma = snr / 2  # so the weight clips
    weighted = run("sdxl", model, min_snr_gamma=gamma)[2]
    assert float(sigmas[1][0]) == float(sigmas[0][0])  # the same draw
    weight = gamma / snr if prediction == "eps" else gamma / (snr + 1)
    assert weighted["loss"][0] == pytest.approx(plain["loss"][0] * weight, rel=1e-5)


def test_options_a_flow_model_has_no_meaning_for_are_refused_and_shift_on_sdxl():
    with pytest.raises(ValueError, match="min_snr_gamma weights epsilon and v-prediction"):
        run("flux", min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="applies to flow-matching models"):
        run("sdxl", timestep_shift="fixed")


def test_timestep_shift_modes_against_the_hosts_own_schedules():
    """model: the host's percent_to_sigma; fixed: s t / (1 + (s - 1) t); flux resolution: the
    schedule of the host's ModelSamplingFlux node set to the latent's pixel size."""
    import comfy_extras.nodes_model_advanced as advanced

    T_ = pack_module("nodes.train_objective")
    model = tiny("flux")
    ms = model.get_model_object("model_sampling")
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97])
    shape = (1, 16, 48, 80)  # 384 x 640 pixels

    def sigmas(**options):
        return T_.Objective(1, 1, 0, T_.ObjectiveOptions(**options)).sigmas(t, ms, "flow matching", shape)

    expected = torch.tensor([float(ms.percent_to_sigma(1 - float(v))) for v in t])
    assert torch.allclose(sigmas(), expected, atol=1e-6)
    assert torch.allclose(sigmas(shift="fixed", shift_value=3.0), 3 * t / (1 + 2 * t), atol=1e-6)
    with torch.inference_mode():
        sized = advanced.ModelSamplingFlux().patch(model, 1.15, 0.5, shape[-1] * 8, shape[-2] * 8)[0]
    host_ms = sized.get_model_object("model_sampling")
    host = torch.tensor([float(host_ms.percent_to_sigma(1 - float(v))) for v in t])
    resolution = sigmas(shift="flux resolution")
    assert torch.allclose(resolution, host, atol=1e-5)
    assert not torch.allclose(resolution, expected, atol=1e-3)  # differs from the default 1.15


def test_logit_normal_noise_levels_reach_the_flow_model(monkeypatch):
    """The sigma the node feeds a flow model is sigmoid(N(m, s)) through the fixed shift, drawn
    from the seeded generator after the image order and the noise."""
    sigmas = recorded_sigmas(monkeypatch)
    model = tiny("flux")
    run("flux", timestep_sampling="logit-normal", logit_mean=0.5, logit_std=0.8, timestep_shift="fixed",
        shift=2.0, seed=7)
    g = torch.Generator().manual_seed(7)
    torch.randperm(1, generator=g)
    torch.randn(dit_inputs.latent_shape("flux", model), generator=g)
    t = torch.sigmoid(0.5 + 0.8 * torch.randn(1, generator=g))
    assert float(sigmas[0][0]) == pytest.approx(float(2 * t / (1 + t)), rel=1e-5)


def test_flux_guidance_is_what_the_model_receives():
    model = tiny("flux")
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("guidance")), with_kwargs=True)
    try:
        run("flux", flux_guidance=1.0)
        given = len(seen)
        run("flux")
    finally:
        hook.remove()
    assert given and all(g is not None for g in seen)
    assert {float(g.flatten()[0]) for g in seen[:given]} == {1.0}
    assert {float(g.flatten()[0]) for g in seen[given:]} == {3.5}  # the host's default without FluxGuidance


# ----- captions and batches ------------------------------------------------------------------------
def test_caption_dropout_of_one_trains_on_the_empty_caption_or_zeros(fixed_batches):
    empty = dit_inputs.conditioning("flux", seed=5)  # stands for the encoded empty caption
    dropped = run("flux", steps=2, caption_dropout=1.0, empty_conditioning=empty)[2]["loss"]
    assert dropped == pytest.approx(run("flux", steps=2, conditioning=empty)[2]["loss"], rel=1e-6)
    cond = dit_inputs.conditioning("flux")
    zero = [[torch.zeros_like(cond[0][0]), {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                                            for k, v in cond[0][1].items()}]]
    zeros = run("flux", steps=2, caption_dropout=1.0)[2]["loss"]
    assert zeros == pytest.approx(run("flux", steps=2, conditioning=zero)[2]["loss"], rel=1e-6)
    assert zeros != pytest.approx(dropped, rel=1e-3)


def test_gradient_accumulation_equals_a_larger_batch():
    """SGD (an update linear in the gradient): 2 micro-batches of 1 == one batch of 2."""
    runs = {}
    for accumulation, batch in ((1, 2), (2, 1)):
        _, lycoris, loss, _ = run("flux", images=2, steps=2, batch_size=batch, gradient_accumulation=accumulation,
                                  optimizer="SGD", learning_rate=0.5)
        runs[accumulation] = (adapter_params(lycoris), loss["loss"], lycoris.metadata)
    (big, big_loss, _), (acc, acc_loss, meta) = runs[1], runs[2]
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    assert meta["ss_gradient_accumulation_steps"] == "2"
    for k in big:
        assert torch.allclose(acc[k], big[k], rtol=1e-4, atol=1e-7), k
    single = adapter_params(run("flux", images=2, steps=2, optimizer="SGD", learning_rate=0.5)[1])
    assert any(not torch.allclose(v, big[k], rtol=1e-4, atol=1e-7) for k, v in single.items())


# ----- saving and resuming -------------------------------------------------------------------------
def test_save_every_n_steps_and_resume_exactly(loras_first, monkeypatch):
    """4 steps in one run == the step-2 checkpoint resumed (adapters + optimizer state) for 2 more,
    with rank dropout, a cosine schedule and two images, so the RNG, the schedule and the image
    order must continue too."""
    import folder_paths

    from comfyui_lycoris_under_test.lycoris_core import load_file

    monkeypatch.setattr(folder_paths, "output_directory", str(loras_first))
    options = dict(images=2, lr_schedule="cosine", warmup_steps=1, rank_dropout=0.2, learning_rate=1e-2)
    _, whole, loss, _ = run("flux", steps=4, save_every=2, save_prefix="ckpt/run", **options)
    folder = os.path.join(str(loras_first), "ckpt")
    files = sorted(os.listdir(folder))
    assert files == ["run_00001_step000002.optim.pt", "run_00001_step000002.safetensors",
                     "run_00001_step000004.optim.pt", "run_00001_step000004.safetensors"]
    last = load_file(os.path.join(folder, files[-1]))
    assert last.metadata["ss_steps"] == "4" and last.metadata["ss_output_name"] == "run_00001_step000004"
    assert all(torch.equal(t, whole[n].export()[k]) for n, a in last.items() for k, t in a.export().items())
    half = "ckpt/run_00001_step000002.safetensors"
    _, resumed, loss2, _ = run("flux", steps=4, resume_file=half, **options)
    assert loss2["loss"] == pytest.approx(loss["loss"][2:], rel=1e-5)
    assert resumed.metadata["ss_steps"] == "4"
    a, b = adapter_params(whole), adapter_params(resumed)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    without = adapter_params(run("flux", steps=2, resume_file=half, resume_state=False, **options)[1])
    assert any(not torch.allclose(a[k], v, rtol=1e-5, atol=1e-7) for k, v in without.items())
    with pytest.raises(ValueError, match="already trained 2 steps"):
        run("flux", steps=2, resume_file=half, **options)
    run("flux", steps=1, save_every=1, save_prefix="ckpt/run")
    assert "run_00002_step000001.safetensors" in os.listdir(folder)  # a new run number, nothing overwritten


# ----- network arguments and optimizers ------------------------------------------------------------
def test_train_norm_adds_norm_adapters_that_train():
    _, lycoris, _, _ = run("sdxl", steps=2, train_norm=True, learning_rate=1e-2)
    assert {a.algo for a in lycoris.values()} == {"lora", "norm"}
    norms = [a for a in lycoris.values() if a.algo == "norm"]
    assert all(float(p.abs().sum()) > 0 for a in norms for p in a.parameters())
    assert json.loads(lycoris.metadata["ss_network_args"])["train_norm"] == "True"


def test_diag_oft_with_a_fixed_number_of_blocks_in_the_node():
    _, lycoris, loss, _ = run("flux", algorithm="diag-oft", oft_blocks=4)
    assert lycoris and all(a.oft_blocks.shape[0] == 4 for a in lycoris.values())
    assert all(math.isfinite(v) for v in loss["loss"])


def test_every_optimizer_is_listed_and_a_missing_one_names_its_package(monkeypatch):
    listed = pack_module("nodes.train").LycorisTrain.INPUT_TYPES()["required"]["optimizer"][0]
    assert {"AdamW", "AdamW8bit", "Adafactor", "Prodigy"} <= set(listed)
    for key in [k for k in sys.modules if k == "prodigyopt" or k.startswith("prodigyopt.")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(Exception, match="pip install prodigyopt"):
        run("flux", optimizer="Prodigy")
    lycoris = run("flux", steps=2, optimizer="Adafactor")[1]
    assert lycoris.metadata["ss_optimizer"] == "transformers.optimization.Adafactor"
