"""LyCORIS Train on every model family users run now (tests/host/dit.py: tiny random-weight models
built from the host's own classes), fed as a prompt feeds it: a LATENT of the family's channels and
dimensionality and a CONDITIONING list from a text encoder (tests/host/dit_inputs.py).

One short run per family (LoRA, rank 4, attention and MLP layers, 8x8 latents), shared by the tests:
the loss is the host model's own objective (flow matching for the DiTs, epsilon for SDXL), the
adapters train, and the file the pack saves loads back here (changing the model's output exactly
as the trained value does) and in lycoris-lora (the same merged weights).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from host import dit, dit_inputs
from host.helpers import pack_module, rel_err

STEPS = 3
RANK = 4
# the host's model types (comfy.model_base.ModelType) -> the objective the loss must regress
OBJECTIVE_OF_TYPE = {"EPS": "epsilon", "V_PREDICTION": "v-prediction", "FLOW": "flow matching",
                     "FLUX": "flow matching"}
OBJECTIVE_OF_FAMILY = {name: "epsilon" if name == "sdxl" else "flow matching" for name in dit.FAMILY_NAMES}

# adapters that cannot train because the model drops what their layer computes: the text stream of
# Qwen-Image's last block (its output is discarded; image tokens read only its keys and values)
UNUSED = {"qwen_image": re.compile(r"lora_unet_transformer_blocks_1_(txt_mlp_|attn_add_q_proj|attn_to_add_out)")}

_RUNS: dict = {}


pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")


class Run:
    """One family's tiny model, its inputs, and what LyCORIS Train returned for them."""

    def __init__(self, family: str):
        self.family = family
        self.model = dit.load(family)
        self.latent = dit_inputs.latents(family, self.model)
        self.cond = dit_inputs.conditioning(family)
        train = pack_module("nodes.train")
        with torch.inference_mode():
            self.trained, self.lycoris, self.loss, _ = train.LycorisTrain().train(
                model=self.model, latents=self.latent, conditioning=self.cond, algorithm="lora",
                preset="attn-mlp", rank=RANK, alpha=float(RANK), conv_rank=0, conv_alpha=1.0,
                steps=STEPS, batch_size=1, learning_rate=1e-2, optimizer="AdamW",
                lr_schedule="constant", warmup_steps=0, seed=0, gradient_checkpointing=True,
                training_dtype="auto")


def run(family: str) -> Run:
    """The family's training run, made once per test process."""
    if family not in _RUNS:
        _RUNS[family] = Run(family)
    return _RUNS[family]


def denoised(model, r: Run) -> torch.Tensor:
    """One Euler step of the host's own sampler from pure noise: the model's prediction there."""
    import comfy.sample

    noise = torch.randn(r.latent["samples"].shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", r.cond, r.cond,
                                   r.latent["samples"], disable_pbar=True, seed=1).float()


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_a_short_run_trains_with_the_models_objective(family):
    r = run(family)
    losses = r.loss["loss"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    model_type = r.model.model.model_type.name
    assert r.loss["objective"] == OBJECTIVE_OF_FAMILY[family] == OBJECTIVE_OF_TYPE[model_type]
    assert r.lycoris and all(n.startswith("lora_unet_") for n in r.lycoris)
    unused = UNUSED.get(family)
    still = [n for n, a in r.lycoris.items() if float(a.up.abs().sum()) == 0]  # up starts at 0
    assert [n for n in still if unused is None or not unused.match(n)] == []
    assert unused is None or len(still) == len([n for n in r.lycoris if unused.match(n)]) > 0
    assert r.lycoris.metadata["ss_steps"] == str(STEPS)


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_the_saved_file_loads_back_and_changes_the_output(family, tmp_path):
    r = run(family)
    path = pack_module("nodes.save").save_lycoris(r.lycoris, f"{family}/trained", torch.float32,
                                                  root=str(tmp_path))
    adapters = pack_module("nodes.host_compat").read_adapters(path)
    assert set(adapters) == set(r.lycoris)
    applied = pack_module("nodes.apply").apply_lycoris(r.model, None, adapters, 1.0, 0.0)[0]
    base, loaded, trained = denoised(r.model, r), denoised(applied, r), denoised(r.trained, r)
    assert rel_err(loaded, base) > 1e-4
    assert rel_err(loaded, trained) < 1e-5


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_the_saved_file_gives_the_same_weights_in_lycoris(family, tmp_path):
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    r = run(family)
    path = pack_module("nodes.save").save_lycoris(r.lycoris, f"{family}/trained", torch.float32,
                                                  root=str(tmp_path))
    diffusion = r.model.model.diffusion_model
    prefix = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, path, diffusion)
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    assert {m.lora_name for m in network.loras} == set(r.lycoris)
    with torch.no_grad():
        for module in network.loras:
            w = module.org_weight.detach().float()
            theirs = module.get_merged_weight(1.0)[0].float()
            assert rel_err(r.lycoris[module.lora_name].merge(w, 1.0), theirs) < 1e-5, module.lora_name


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_saved_activations_are_copied_only_for_models_that_update_them_in_place(family, monkeypatch):
    """Without gradient checkpointing, Flux's blocks change activations autograd saved (`x += …`
    after `norm(x)`): the first backward fails, the trainer switches copying on and retries. The
    SD UNet needs no copies and never pays for them."""
    train, loop = pack_module("nodes.train"), pack_module("nodes.train_loop")
    switched_on = []
    copying = loop.activations_copied

    def counted():
        switched_on.append(True)
        return copying()

    monkeypatch.setattr(loop, "activations_copied", counted)
    model = dit.load(family)
    with torch.inference_mode():
        loss = train.LycorisTrain().train(
            model=model, latents=dit_inputs.latents(family, model), conditioning=dit_inputs.conditioning(family),
            algorithm="lora", preset="attn-mlp", rank=RANK, alpha=float(RANK), conv_rank=0, conv_alpha=1.0,
            steps=2, batch_size=1, learning_rate=1e-2, optimizer="AdamW", lr_schedule="constant",
            warmup_steps=0, seed=0, gradient_checkpointing=False, training_dtype="auto")[2]
    assert len(loss["loss"]) == 2 and all(map(math.isfinite, loss["loss"]))
    assert switched_on == ([True] if family == "flux" else [])
