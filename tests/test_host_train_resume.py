"""Exact resumes in LyCORIS Train of what the diffusion-model resume test (test_host_train_options.py)
does not cover: text-encoder modules (Flux's CLIP-L and T5) and `use_scalar` adapters, inside a
real ComfyUI on the tiny Flux of tests/test_host_train_te.py.

The oracle is the uninterrupted run: 4 steps in one run must equal the step-2 checkpoint (its file
and the `.optim.pt` beside it) resumed for 2 more (losses, every trained parameter, the trained
CLIP's encoding), with a cosine schedule, a warm-up and rank dropout, so the schedule, the RNG and
the data order must continue too.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from host.te_training import encode, forget_runs, run, te_modules, tiny_host

pytestmark = pytest.mark.usefixtures("quiet_warnings")

_HALF: dict = {}  # prefix -> (the 4-step run, its step-2 checkpoint)
OPTIONS = dict(lr_schedule="cosine", warmup_steps=1, rank_dropout=0.2, learning_rate=1e-2, text_encoder_lr=1e-2)


@pytest.fixture(scope="module", autouse=True)
def output_in_loras(loras_dir, one_thread):
    """Checkpoints go to the test `loras` folder, where resume_file finds them."""
    import folder_paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(folder_paths, "output_directory", str(loras_dir))
        yield str(loras_dir)
    _HALF.clear()
    forget_runs()


def params(lycoris) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p.detach().clone() for n, a in lycoris.items() for k, p in a.named_parameters()}


def assert_same_run(whole: dict, resumed: dict) -> None:
    """The resumed run's last two losses and final parameters are the uninterrupted run's."""
    assert resumed["loss"]["loss"] == pytest.approx(whole["loss"]["loss"][2:], rel=1e-5)
    assert resumed["lycoris"].metadata["ss_steps"] == "4"
    a, b = params(whole["lycoris"]), params(resumed["lycoris"])
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def half_run(prefix: str, **kw) -> tuple[dict, str]:
    """(the 4-step run, its step-2 checkpoint as a `loras` name), made once per prefix."""
    if prefix not in _HALF:
        whole = run("flux", steps=4, save_every=2, save_prefix=prefix, **kw)
        _HALF[prefix] = whole, f"{prefix}_00001_step000002.safetensors"
    return _HALF[prefix]


def test_text_encoder_modules_resume_exactly():
    """CLIP-L (`lora_te1_`) and T5 (`lora_te3_`) modules continue on the CLIP with their own
    learning rate and optimizer state: the resumed run is the uninterrupted one."""
    whole, half = half_run("te_resume/run", **OPTIONS)
    resumed = run("flux", steps=4, resume_file=half, **OPTIONS)
    assert {n[:9] for n in te_modules(resumed["lycoris"])} == {"lora_te1_", "lora_te3_"}
    assert_same_run(whole, resumed)
    assert float(resumed["lycoris"].metadata["ss_text_encoder_lr"]) == OPTIONS["text_encoder_lr"]
    for got, want in zip(encode(resumed["clip"]), encode(whole["clip"])):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_text_encoder_modules_are_kept_when_it_is_off(loras_dir):
    """train_text_encoder off: the file's text-encoder modules come out exactly as saved (the
    CLIP output is the input), the diffusion model's continue; resuming the optimizer state of a
    run that trained them is refused, since it cannot continue exactly."""
    from comfyui_lycoris_under_test.lycoris_core import load_file

    _, half = half_run("te_resume/run", **OPTIONS)
    saved = load_file(os.path.join(str(loras_dir), half))
    kept = run("flux", steps=3, resume_file=half, train_text_encoder=False, resume_state=False)
    te = te_modules(kept["lycoris"])
    assert set(te) == set(te_modules(saved)) and te
    for name, adapter in te.items():
        want = saved[name].export()
        assert all(torch.equal(t, want[k]) for k, t in adapter.export().items()), name
    assert kept["clip"] is tiny_host("flux")[1]
    unet = [n for n in kept["lycoris"] if n.startswith("lora_unet_")]
    assert unet and any(not torch.equal(kept["lycoris"][n].export()["lora_up.weight"],
                                        saved[n].export()["lora_up.weight"]) for n in unet)
    with pytest.raises(ValueError, match="parameters that this run does not"):
        run("flux", steps=3, resume_file=half, train_text_encoder=False)


def test_resuming_an_adapter_without_text_encoder_modules_is_refused():
    unet_only = run("flux", steps=1, train_text_encoder=False)["lycoris"]
    assert not te_modules(unet_only)
    with pytest.raises(ValueError, match="no text-encoder module"):
        run("flux", steps=2, resume_lycoris=unet_only)


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "glora"])
def test_use_scalar_resumes_exactly(algorithm, loras_dir):
    """A use_scalar adapter's file holds the scalar baked into its factors; the state beside it
    keeps the scalar and the unscaled factors, so the resumed run trains the same parameterisation
    with the same optimizer moments (LoRA: its text-encoder modules too). A state that does not
    belong to the file is refused."""
    from comfyui_lycoris_under_test.lycoris_core import load_file

    kw = dict(OPTIONS, algorithm=algorithm, use_scalar=True, train_text_encoder=algorithm == "lora")
    whole, half = half_run(f"scalar/{algorithm}", **kw)
    assert all(a.scalar is not None for a in whole["lycoris"].values())
    saved = load_file(os.path.join(str(loras_dir), half))
    assert not any(a.scalar is not None for a in saved.values())  # baked into the file's factors
    resumed = run("flux", steps=4, resume_file=half, **kw)
    assert all(a.scalar is not None for a in resumed["lycoris"].values())
    assert_same_run(whole, resumed)
    if algorithm == "lora":
        assert te_modules(resumed["lycoris"])
    # the step-4 state beside a copy of the step-2 file: its factors do not give the file's
    folder = os.path.join(str(loras_dir), "scalar")
    stray = os.path.join(folder, f"{algorithm}_stray.safetensors")
    shutil.copy(os.path.join(str(loras_dir), half), stray)
    shutil.copy(os.path.join(folder, f"{algorithm}_00001_step000004.optim.pt"),
                os.path.join(folder, f"{algorithm}_stray.optim.pt"))
    with pytest.raises(ValueError, match="belong to another file"):
        run("flux", steps=6, resume_file=f"scalar/{algorithm}_stray.safetensors", **kw)
