"""Strength over sampling steps inside ComfyUI: a tiny Flux sampled through the host's own sampler
at sigmas of known percents; each step's layer output must be base + s(p) * m * delta for the
schedule's s(p) (worked out here from its definition), and exactly the base layer outside
[start, end]; in bypass and in merge mode (which bypasses scheduled layers), from the loader
and from a stack slot."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from host import dit, dit_inputs
from host.helpers import pack_module, unload_all

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")
FAMILY = "flux"
# (first) double-stream and single-stream Linears of the tiny Flux
SITES = ("diffusion_model.double_blocks.0.img_attn.proj", "diffusion_model.single_blocks.0.linear2")
PERCENTS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)  # one model call per percent (euler, cfg 1)
RANK, ALPHA, STRENGTH = 4, 2.0, 0.8
SCHEDULES = {  # (start, end, start strength, end strength, curve) and s(p) written out by hand
    "linear": ((0.2, 0.8, 1.0, 0.25, "linear"),
               lambda p: 1.0 + (0.25 - 1.0) * (p - 0.2) / 0.6 if 0.2 <= p <= 0.8 else 0.0),
    "cosine": ((0.1, 1.0, 0.0, 1.5, "cosine"),
               lambda p: 1.5 * (1 - math.cos(math.pi * (p - 0.1) / 0.9)) / 2 if p >= 0.1 else 0.0),
    "constant": ((0.0, 0.5, 0.7, 3.0, "constant"), lambda p: 0.7 if p <= 0.5 else 0.0),
}


@pytest.fixture(scope="module")
def tiny(lycoris_pack):
    return dit.load(FAMILY)


@pytest.fixture(scope="module")
def lora(tiny):
    """A LoRA on SITES, named by the model's own keys: {site: (down, up)} and the state dict."""
    import comfy.utils

    g = torch.Generator().manual_seed(5)
    factors, tensors = {}, {}
    for site in SITES:
        out_dim, in_dim = comfy.utils.get_attr(tiny.model, site).weight.shape
        down, up = torch.randn(RANK, in_dim, generator=g) * 0.3, torch.randn(out_dim, RANK, generator=g) * 0.3
        factors[site] = (down, up)
        tensors.update({f"{site}.lora_down.weight": down, f"{site}.lora_up.weight": up,
                        f"{site}.alpha": torch.tensor(ALPHA)})
    return factors, tensors


def _schedule(name):
    return pack_module("nodes.schedule").LycorisStrengthSchedule().schedule(*SCHEDULES[name][0])[0]


def _sample_and_record(model):
    """Sample at sigmas of PERCENTS; per site, the (input, output) of each model call in order."""
    import comfy.sample
    import comfy.samplers
    import comfy.utils

    calls = {site: [] for site in SITES}
    handles = [comfy.utils.get_attr(model.model, site).register_forward_hook(
        lambda mod, args, out, site=site: calls[site].append((args[0].detach().clone(),
                                                              out.detach().clone())))
        for site in SITES]
    ms = model.get_model_object("model_sampling")
    sigmas = torch.tensor([float(ms.percent_to_sigma(p)) for p in PERCENTS] + [0.0])
    latent = dit_inputs.latents(FAMILY, model)["samples"]
    cond = dit_inputs.conditioning(FAMILY)
    try:
        with torch.inference_mode():
            comfy.sample.sample_custom(model, torch.randn_like(latent), 1.0,
                                       comfy.samplers.sampler_object("euler"), sigmas, cond, cond,
                                       latent, disable_pbar=True, seed=0)
    finally:
        for h in handles:
            h.remove()
    unload_all()
    return calls


def _check(model_out, tiny, factors, s):
    """Each call's output against F.linear with W + s(p) * m * (alpha/rank) * up @ down."""
    import comfy.utils

    calls = _sample_and_record(model_out)
    for site in SITES:
        layer = comfy.utils.get_attr(tiny.model, site)
        w, b = layer.weight.detach().float(), layer.bias.detach().float()
        down, up = factors[site]
        delta = (ALPHA / RANK) * up @ down
        assert len(calls[site]) == len(PERCENTS), site
        for p, (x, out) in zip(PERCENTS, calls[site]):
            expected = F.linear(x.float(), w + s(p) * STRENGTH * delta, b)
            if s(p) == 0:  # off: the plain layer, bit for bit
                assert torch.equal(out, type(layer).forward(layer, x)), (site, p)
            else:
                err = float((out.float() - expected).norm() / expected.norm())
                assert err < 1e-5, (site, p, s(p), err)
    return calls


@pytest.mark.parametrize("mode", ["bypass", "merge"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_layer_strength_follows_the_schedule(name, mode, tiny, lora):
    from lycoris_core import load_file

    factors, tensors = lora
    out, _, report = pack_module("nodes.apply").apply_lycoris(
        tiny, None, load_file(tensors), STRENGTH, 0.0, mode, None, _schedule(name))
    assert f"{len(SITES)} bypassed" in report and "strength schedule: " in report
    if mode == "merge":
        assert "scheduled: bypassed" in report
    _check(out, tiny, factors, SCHEDULES[name][1])


def test_stack_slot_schedule_equals_the_loader_one(tiny, lora):
    from lycoris_core import load_file

    factors, tensors = lora
    stack = pack_module("nodes.stack")
    files = load_file(tensors)
    item = pack_module("nodes.apply").StackItem(files, STRENGTH, 0.0, "merge", schedule=_schedule("linear"))
    out, _, _ = pack_module("nodes.apply").apply_stack(tiny, None, [item])
    _check(out, tiny, factors, SCHEDULES["linear"][1])
    assert stack.LycorisStack.INPUT_TYPES()["optional"]["schedule_1"][0] == "LYCORIS_SCHEDULE"


def test_unscheduled_adapters_on_the_same_layers_keep_their_strength(tiny, lora):
    """A plain bypass adapter stacked under a scheduled one is untouched by the schedule."""
    from lycoris_core import load_file

    factors, tensors = lora
    apply = pack_module("nodes.apply")
    files = load_file(tensors)
    items = [apply.StackItem(files, STRENGTH, 0.0, "bypass"),
             apply.StackItem(files, STRENGTH, 0.0, "bypass", schedule=_schedule("constant"))]
    out, _, _ = apply.apply_stack(tiny, None, items)
    _check(out, tiny, factors, lambda p: 1.0 + SCHEDULES["constant"][1](p))


def test_percent_of_sigma_inverts_the_models_percent_to_sigma(tiny):
    schedule = pack_module("nodes.schedule")
    ms = tiny.get_model_object("model_sampling")
    for p in (0.0, 0.01, 0.3, 0.5, 0.99, 1.0):
        assert abs(schedule.percent_of_sigma(ms, float(ms.percent_to_sigma(p))) - p) < 1e-6


def test_bad_schedules_are_refused(lycoris_pack):
    node = pack_module("nodes.schedule").LycorisStrengthSchedule()
    with pytest.raises(ValueError, match="start_percent"):
        node.schedule(0.8, 0.2, 1.0, 1.0, "linear")
    with pytest.raises(ValueError, match="curve"):
        pack_module("nodes.schedule").StrengthSchedule(curve="bounce")


def test_outside_sampling_the_plain_strength_applies(tiny, lora):
    """No sampler, no step: a scheduled adapter runs at its loader strength."""
    import comfy.utils

    from host.helpers import load
    from lycoris_core import load_file

    factors, tensors = lora
    out, _, _ = pack_module("nodes.apply").apply_lycoris(
        tiny, None, load_file(tensors), STRENGTH, 0.0, "bypass", None, _schedule("cosine"))
    load(out)
    site = SITES[0]
    layer = comfy.utils.get_attr(out.model, site)
    x = torch.randn(1, 3, layer.weight.shape[1])
    down, up = factors[site]
    with torch.inference_mode():
        got = layer(x)
    expected = F.linear(x, layer.weight.float() + STRENGTH * (ALPHA / RANK) * up @ down, layer.bias.float())
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_loader_node_takes_the_schedule(tiny, lora, loras_dir):
    import os

    from safetensors.torch import save_file

    factors, tensors = lora
    save_file(tensors, os.path.join(loras_dir, "scheduled_tiny_flux.safetensors"))
    loader = pack_module("nodes.loaders").LoadLycorisModelOnly
    assert loader.INPUT_TYPES()["optional"]["schedule"][0] == "LYCORIS_SCHEDULE"
    out, report = loader().load_model_only(tiny, "scheduled_tiny_flux.safetensors", STRENGTH, "auto",
                                           schedule=_schedule("cosine"))["result"]
    assert "strength schedule: x0 -> x1.5 (cosine) from 10% to 100%" in report
    _check(out, tiny, factors, SCHEDULES["cosine"][1])
