"""Training options of the core, each against a formula written here: timestep sampling (uniform,
logit-normal) and shift against their distribution functions, min-SNR-gamma weights against the
SD1.5 noise schedule, offset noise, gradient accumulation against one large batch, resuming with the
optimizer state against an uninterrupted run, optional optimizers, Diag-OFT with a fixed number of
blocks."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from lycoris_core import LycorisError, load_file
from lycoris_core.save import save_file
from lycoris_core.train import (Root, Trainer, attached, create_adapters, default_kinds, flux_resolution_shift,
                                freeze, make_optimizer, min_snr_weight, offset_noise, resume_adapters,
                                sample_t, select_targets, shift_t)
from train_model import tiny_unet

N = 20000
KS_BOUND = 1.63 / math.sqrt(N)  # Kolmogorov-Smirnov, 1% level


pytestmark = pytest.mark.usefixtures("one_thread")


def ks_distance(samples: torch.Tensor, cdf) -> float:
    """sup |empirical CDF - cdf| over the samples."""
    x = samples.double().sort().values
    n = len(x)
    theory = torch.tensor([cdf(float(v)) for v in x], dtype=torch.float64)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    lower = torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper - theory, theory - lower).max())


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ----- timesteps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 1.4), (1.0, 0.6)])
def test_logit_normal_timesteps_follow_the_logit_normal_distribution(mean, std):
    t = sample_t(N, torch.Generator().manual_seed(1), "logit-normal", mean, std)
    assert float(t.min()) > 0 and float(t.max()) < 1
    assert ks_distance(t, lambda x: normal_cdf((math.log(x / (1 - x)) - mean) / std)) < KS_BOUND
    # and it is not uniform
    assert ks_distance(t, lambda x: x) > 5 * KS_BOUND


def test_uniform_timesteps_are_uniform():
    t = sample_t(N, torch.Generator().manual_seed(2), "uniform")
    assert ks_distance(t, lambda x: x) < KS_BOUND


@pytest.mark.parametrize("s", [3.0, 0.5, 1.0])
def test_shifted_timesteps_follow_the_shifted_distribution(s):
    t = shift_t(sample_t(N, torch.Generator().manual_seed(3), "uniform"), s)
    # t' = s t / (1 + (s - 1) t)  <=>  t = t' / (s - (s - 1) t'): P(t' <= y) = y / (s - (s - 1) y)
    assert ks_distance(t, lambda y: y / (s - (s - 1) * y)) < KS_BOUND
    assert float(shift_t(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)


def test_flux_resolution_shift_is_lineal_in_tokens_between_256_and_4096():
    # Flux: mu = 0.5 at 256 image tokens (256x256 px), 1.15 at 4096 (1024x1024 px); s = e^mu
    assert flux_resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert flux_resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert flux_resolution_shift(2176) == pytest.approx(math.exp(0.825))
    # flux_time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1) is the SD3 shift with s = e^mu
    t, mu = torch.tensor([0.1, 0.5, 0.9]), 1.15
    flux = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
    assert torch.allclose(shift_t(t, math.exp(mu)), flux)


def test_bad_timestep_settings_raise():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(LycorisError, match="known: uniform, logit-normal"):
        sample_t(4, g, "beta")
    with pytest.raises(LycorisError, match="std > 0"):
        sample_t(4, g, "logit-normal", 0.0, 0.0)
    with pytest.raises(LycorisError, match="shift must be > 0"):
        shift_t(torch.rand(3), 0.0)


# ----- loss weights and noise ----------------------------------------------------------------------
def sd15_alphas_cumprod() -> torch.Tensor:
    """SD1.5's "scaled linear" schedule: betas linear in sqrt between 0.00085 and 0.012, 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


@pytest.mark.parametrize("gamma", [5.0, 1.0, 20.0])
def test_min_snr_weights_at_known_timesteps(gamma):
    ac = sd15_alphas_cumprod()[[0, 50, 200, 500, 999]]
    snr = ac / (1 - ac)
    sigma = ((1 - ac) / ac).sqrt()  # what ComfyUI calls sigma for these models
    eps = min_snr_weight(1.0 / sigma.square(), gamma, "epsilon")
    v = min_snr_weight(1.0 / sigma.square(), gamma, "v-prediction")
    for i in range(len(ac)):
        s = float(snr[i])
        assert float(eps[i]) == pytest.approx(min(s, gamma) / s, rel=1e-9)
        assert float(v[i]) == pytest.approx(min(s, gamma) / (s + 1), rel=1e-9)
    assert float(eps[-1]) == pytest.approx(1.0)  # low SNR (noisy end): full weight for epsilon
    with pytest.raises(LycorisError, match="epsilon and v-prediction"):
        min_snr_weight(snr, gamma, "flow matching")


def test_noise_offset_adds_a_per_channel_constant_of_the_given_scale():
    base = torch.zeros(4000, 3, 5, 6)
    out = offset_noise(base, 0.1, torch.Generator().manual_seed(4))
    assert torch.equal(out, out[..., :1, :1].expand_as(out))  # constant over H, W
    assert float(out[:, :, 0, 0].std()) == pytest.approx(0.1, rel=0.05)
    assert float(out[:, :, 0, 0].mean()) == pytest.approx(0.0, abs=0.01)
    video = offset_noise(torch.zeros(2, 3, 4, 5, 6), 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(video, video[:, :, :1, :1, :1].expand_as(video))
    x = torch.randn(2, 3, 4, 4)
    assert offset_noise(x, 0.0, torch.Generator()) is x


# ----- loop ------------------------------------------------------------------------------------------
def build(model, algo="lora", seed=0, **options):
    """Adapters on every layer, initialised from `seed` (the same init in every run)."""
    targets = select_targets(Root(model), "full", kinds=default_kinds(algo))
    torch.manual_seed(seed)
    return create_adapters(targets, algo, rank=4, alpha=2.0, **options)


def regression(seed=5, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


def params(built):
    return {f"{n}.{k}": p.detach().clone() for n, a in built.adapters.items() for k, p in a.named_parameters()}


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_gradient_accumulation_equals_one_large_batch(optimizer):
    x, y = regression()
    results = []
    for accumulation, batch in ((1, 8), (4, 2)):
        model = tiny_unet()
        built = build(model)
        trainer = Trainer(built.adapters, steps=3, lr=1e-2, optimizer=optimizer, max_grad_norm=0.05,
                          accumulation=accumulation)
        micro = iter(range(100))

        def loss():
            k = next(micro) % accumulation
            return F.mse_loss(model(x[k * batch:(k + 1) * batch]), y[k * batch:(k + 1) * batch])

        with attached(built.pairs()):
            losses = [trainer.step(loss) for _ in range(3)]
        results.append((params(built), losses))
    (big, big_losses), (acc, acc_losses) = results
    assert acc_losses == pytest.approx(big_losses, rel=1e-5)
    start = params(build(tiny_unet()))
    assert any(not torch.equal(big[k], start[k]) for k in big)
    for k in big:  # Adam turns float rounding of near-zero gradients into lr-sized steps: compare updates
        moved = (big[k] - start[k]).abs().max()
        assert float((acc[k] - big[k]).abs().max()) <= 1e-4 * float(moved) + 1e-7, k


def test_accumulation_differs_from_one_small_batch():
    """The accumulated step is not just the last micro-batch (the test above can fail)."""
    x, y = regression()
    out = []
    for accumulation in (1, 2):
        model = tiny_unet()
        built = build(model)
        trainer = Trainer(built.adapters, steps=1, lr=1e-2, accumulation=accumulation)
        calls = iter(range(10))
        with attached(built.pairs()):
            trainer.step(lambda: F.mse_loss(model(x[next(calls) * 2:][:2]), y[:2]))
        out.append(params(built))
    assert any(not torch.allclose(out[0][k], out[1][k]) for k in out[0])


@pytest.mark.parametrize("optimizer,schedule", [("AdamW", "cosine"), ("Adafactor", "constant")])
def test_resuming_with_the_optimizer_state_continues_exactly(optimizer, schedule, tmp_path):
    """4 steps in one run == 2 steps, save (adapters + optimizer state), load, 2 more steps."""
    if optimizer == "Adafactor":
        pytest.importorskip("transformers")
    x, y = regression(n=4)
    total = 4

    def run(built, model, trainer, steps):
        with attached(built.pairs()):
            for _ in range(steps):
                trainer.step(lambda: F.mse_loss(model(x), y))

    def new_trainer(built):
        return Trainer(built.adapters, steps=total, lr=1e-2, optimizer=optimizer, schedule=schedule,
                       warmup_steps=1, weight_decay=0.01, max_grad_norm=1.0)

    model = tiny_unet()
    whole = build(model, dora="out")
    run(whole, model, new_trainer(whole), total)

    model = tiny_unet()
    first = build(model, dora="out")
    trainer = new_trainer(first)
    run(first, model, trainer, 2)
    path = str(tmp_path / "half.safetensors")
    save_file(first.adapters, path, dtype=torch.float32)
    torch.save(trainer.state_dict(), str(tmp_path / "half.optim.pt"))
    saved = load_file(path)
    lookup = dict(reversed([(n, first.modules[n]) for n in saved]))  # another adapter order
    resumed, missing = resume_adapters(dict(reversed(list(saved.items()))), lookup)
    assert missing == []
    trainer = new_trainer(resumed)
    trainer.load_state_dict(torch.load(str(tmp_path / "half.optim.pt"), weights_only=True))
    assert trainer.step_count == 2 and trainer.lr == pytest.approx(first_lr(optimizer, schedule))
    run(resumed, model, trainer, total - 2)
    a, b = params(whole), params(resumed)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8), k
    # without the state the continuation differs (the test can fail)
    fresh, _ = resume_adapters(saved, lookup)
    trainer = new_trainer(fresh)
    run(fresh, model, trainer, total - 2)
    assert any(not torch.allclose(a[k], v, rtol=1e-6, atol=1e-8) for k, v in params(fresh).items())


def first_lr(optimizer, schedule):
    """The lr at step 2 of 4 with 1 warm-up step: cosine over the 3 steps after warm-up."""
    if schedule == "constant":
        return 1e-2
    return 1e-2 * 0.5 * (1 + math.cos(math.pi * (2 - 1) / 3))


def test_the_optimizer_state_must_name_every_parameter():
    model = tiny_unet()
    built = build(model)
    trainer = Trainer(built.adapters, steps=2, lr=1e-2)
    with attached(built.pairs()):
        trainer.step(lambda: model(regression()[0]).square().mean())
    state = trainer.state_dict()
    state["param_state"].pop(next(iter(state["param_state"])))
    with pytest.raises(LycorisError, match="no entry for 1 trainable"):
        Trainer(built.adapters, steps=2, lr=1e-2).load_state_dict(state)


# ----- optimizers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,package,module", [("Prodigy", "prodigyopt", "prodigyopt"),
                                                 ("AdamW8bit", "bitsandbytes", "bitsandbytes"),
                                                 ("Adafactor", "transformers", "transformers")])
def test_a_missing_optimizer_package_is_named_with_pip_install(name, package, module, monkeypatch):
    for key in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    built = build(tiny_unet())
    with pytest.raises(LycorisError, match=rf"optimizer {name} needs the package '{package}'.*"
                                           rf"pip install {package}"):
        make_optimizer(built.adapters, name, 1e-3)


def test_adafactor_trains_with_a_fixed_learning_rate():
    pytest.importorskip("transformers")
    model = tiny_unet()
    teacher = build(model)
    with torch.no_grad():
        for a in teacher.adapters.values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    x = regression()[0]
    with attached(teacher.pairs()), torch.no_grad():
        target = model(x)
    student = build(model)
    trainer = Trainer(student.adapters, steps=30, lr=1e-2, optimizer="Adafactor")
    assert type(trainer.optimizer).__name__ == "Adafactor"
    assert trainer.optimizer.defaults["relative_step"] is False
    with attached(student.pairs()):
        losses = [trainer.step(lambda: F.mse_loss(model(x), target)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


# ----- network arguments -----------------------------------------------------------------------------
def test_diag_oft_with_a_fixed_number_of_blocks(tmp_path):
    model = tiny_unet()
    by_size = build(model, "diag-oft")
    built = build(model, "diag-oft", oft_blocks=4)
    assert built.adapters
    for name, a in built.adapters.items():
        out_dim = a.oft_blocks.shape[0] * a.oft_blocks.shape[1]
        assert a.oft_blocks.shape[0] == 4 and out_dim % 4 == 0
        assert by_size.adapters[name].oft_blocks.shape[-1] == 4 or out_dim < 16  # rank 4: blocks of 4
        assert a.oft_blocks.requires_grad and not a.oft_blocks.any()
    x = regression()[0]
    with torch.no_grad():
        base = model(x)
        with attached(built.pairs()):
            assert torch.equal(model(x), base)  # R = I at the start
    trainer = Trainer(built.adapters, steps=3, lr=1e-2)
    with attached(built.pairs()):
        for _ in range(3):
            trainer.step(lambda: (model(x) - 1).square().mean())
    freeze(built.adapters)
    path = str(tmp_path / "oft.safetensors")
    save_file(built.adapters, path)
    loaded = load_file(path)
    for name, a in built.adapters.items():
        assert loaded[name].oft_blocks.shape == a.oft_blocks.shape
        w = built.modules[name].weight.detach().float()
        assert torch.allclose(loaded[name].merge(w, 1.0), a.merge(w, 1.0), atol=1e-6)


def test_a_block_count_that_does_not_divide_leaves_the_layer_out():
    model = tiny_unet()
    out_dims = {n: m.weight.shape[0] for n, m in build(model, "diag-oft").modules.items()}
    blocks = 8  # splits the 16-channel layers, not the 4-channel conv_out
    built = build(model, "diag-oft", oft_blocks=blocks)
    assert set(built.adapters) == {n for n, d in out_dims.items() if d % blocks == 0}
    left = built.ignored.get("cannot create", [])
    assert len(left) == sum(d % blocks != 0 for d in out_dims.values()) and "do not split" in left[0]
    with pytest.raises(LycorisError, match="diag-oft only"):
        build(model, "lora", oft_blocks=2)
