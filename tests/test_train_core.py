"""The training core (lycoris_core.train) on a tiny diffusers-shaped model, for every registered
algorithm: dW = 0 at step 0, the loss falls on a reachable target, base weights never change,
saved files load identically in our reader and in lycoris-lora, resume continues exactly, and
training works on a frozen fp16 base and on weights made under inference mode."""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lycoris_core import LayerSpec, LycorisError, load_file
from lycoris_core.save import save_file
from lycoris_core.train import (PRESETS, Dropout, Root, Trainer, activations_copied, attached, autograd_safe,
                                checkpoint_blocks, checkpointed, create_adapters, default_kinds, freeze,
                                layer_kinds, lr_factor, param_groups, resume_adapters, select_targets,
                                trainable_algorithms)
from oracle import lycoris_applied, reference_forward, rel_err
from train_model import tiny_unet

ALGOS = trainable_algorithms()
STEPS = 25
LR = 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(dtype=torch.float32):
    return torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


def perturb(adapters, scale=0.1, seed=3):
    """Random non-zero values for every trainable parameter (a reachable teacher)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            for p in a.parameters():
                if p.requires_grad:
                    p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def build(model, algo, **options):
    targets = select_targets(Root(model), "full", kinds=default_kinds(algo))
    return create_adapters(targets, algo, rank=4, alpha=2.0, **options)


def fit(model, algo, x, steps=STEPS, **options):
    """Train `algo` towards the output of a perturbed adapter of the same algorithm."""
    teacher = build(model, algo, **options)
    perturb(teacher.adapters)
    with attached(teacher.pairs()), torch.no_grad():
        target = model(x)
    student = build(model, algo, **options)
    trainer = Trainer(student.adapters, steps=steps, lr=LR)
    with attached(student.pairs()):
        losses = [trainer.step(lambda: F.mse_loss(model(x).float(), target.float())) for _ in range(steps)]
    return student, losses


def merged_copy(model, built):
    """A copy of the model with every adapter merged into its layer (our loader's merge path)."""
    merged = copy.deepcopy(model)
    paths = {id(m): p for p, m in model.named_modules()}
    with torch.no_grad():
        for name, adapter in built.adapters.items():
            layer = merged.get_submodule(paths[id(built.modules[name])])
            layer.weight.copy_(adapter.merge(layer.weight.detach(), 1.0))
            if layer.bias is not None:
                layer.bias.copy_(adapter.merge_bias(layer.bias.detach(), 1.0))
    return merged


# ----- targets ---------------------------------------------------------------------------------
def names(targets):
    return {t.name.replace("lora_unet_down_blocks_0_", "") for t in targets}


def test_presets_select_the_documented_layers():
    model = tiny_unet()
    full = names(select_targets(Root(model), "full"))
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "resnets_0_conv1",
            "attentions_0_transformer_blocks_0_attn1_to_q", "attentions_0_proj_in"} <= full
    attn_mlp = names(select_targets(Root(model), "attn-mlp"))
    assert attn_mlp == {"attentions_0_proj_in", "attentions_0_proj_out",
                        "attentions_0_transformer_blocks_0_attn1_to_q",
                        "attentions_0_transformer_blocks_0_attn1_to_k",
                        "attentions_0_transformer_blocks_0_attn1_to_v",
                        "attentions_0_transformer_blocks_0_attn1_to_out_0",
                        "attentions_0_transformer_blocks_0_ff_0", "attentions_0_transformer_blocks_0_ff_2"}
    assert names(select_targets(Root(model), "unet-transformer-only")) == attn_mlp
    assert names(select_targets(Root(model), "attn-only")) == {
        f"attentions_0_transformer_blocks_0_attn1_{n}" for n in ("to_q", "to_k", "to_v", "to_out_0")}
    assert names(select_targets(Root(model), "unet-convblock-only")) == {
        "lora_unet_conv_in", "lora_unet_conv_out", "resnets_0_conv1", "resnets_0_conv2"}
    assert select_targets(Root(model), "custom") == []
    norms = names(select_targets(Root(model), "full", kinds=("norm",)))
    assert "resnets_0_norm1" in norms and "attentions_0_transformer_blocks_0_norm1" in norms


def test_presets_know_comfyui_block_classes():
    blocks = {name: type(name, (nn.Module,), {}) for name in ("SpatialTransformer", "ResBlock", "CrossAttention")}
    root = nn.Module()
    root.input_blocks = nn.ModuleList([nn.Sequential(blocks["ResBlock"](), blocks["SpatialTransformer"]())])
    root.input_blocks[0][0].in_layers = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 4, 3))
    attn = blocks["CrossAttention"]()
    attn.to_q = nn.Linear(4, 4)
    root.input_blocks[0][1].attn1 = attn
    root.input_blocks[0][1].proj_in = nn.Conv2d(4, 4, 1)
    got = {t.path for t in select_targets(Root(root), "attn-mlp")}
    assert got == {"input_blocks.0.1.attn1.to_q", "input_blocks.0.1.proj_in"}
    got = {t.path for t in select_targets(Root(root), "unet-convblock-only")}
    assert got == {"input_blocks.0.0.in_layers.2"}


def test_regex_include_exclude_conv_switch_and_names():
    model = tiny_unet()
    picked = select_targets(Root(model), "custom", include="to_q$\nconv1")
    assert names(picked) == {"attentions_0_transformer_blocks_0_attn1_to_q", "resnets_0_conv1"}
    # an exclude always wins, also against a preset; paths match as well as saved names
    picked = select_targets(Root(model), "attn-mlp", exclude=r"transformer_blocks\.0\.ff")
    assert not any("ff" in t.name for t in picked)
    # conv rank 0 drops spatial convs, 1x1 convs stay (they count as linear)
    picked = select_targets(Root(model), "full", conv=False)
    assert all(not t.kernel_is_spatial for t in picked) and "attentions_0_proj_in" in names(picked)
    # explicit names from the caller (a host key map) replace the default kohya names
    picked = select_targets(Root(model, names={"conv_in": "lora_unet_input_blocks_0_0"}), "custom",
                            include="conv_in")
    assert [t.name for t in picked] == ["lora_unet_input_blocks_0_0"]
    with pytest.raises(LycorisError, match="invalid regex"):
        select_targets(Root(model), "custom", include="(")
    with pytest.raises(LycorisError, match="unknown preset"):
        select_targets(Root(model), "everything")


def test_clashing_saved_names_raise():
    model = tiny_unet()
    with pytest.raises(LycorisError, match="two layers get the saved name"):
        select_targets(Root(model, names=lambda path: "lora_unet_same"), "full")


def test_every_registered_algorithm_is_trainable_here():
    # the registry may grow: every algorithm with a `create` must train some layer kind
    assert {"lora", "loha", "lokr", "ia3", "glora", "diag-oft", "boft", "full", "norm"} <= set(ALGOS)
    assert default_kinds("norm") == ("norm",)
    assert "norm" not in default_kinds("full") and layer_kinds("lora") == ("linear", "conv")


# ----- training, every algorithm -------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGOS)
def test_zero_at_start_loss_falls_base_unchanged_merge_equals_bypass(algo):
    model, x = tiny_unet(), inputs()
    before = state(model)
    with torch.no_grad():
        base = model(x)
    fresh = build(model, algo)
    with attached(fresh.pairs()), torch.no_grad():
        assert torch.allclose(model(x), base, atol=1e-6, rtol=0)
    student, losses = fit(model, algo, x)
    assert losses[-1] < 0.5 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    freeze(student.adapters)
    with attached(student.pairs()), torch.no_grad():
        bypassed = model(x)
    with torch.no_grad():
        merged = merged_copy(model, student)(x)
    assert rel_err(bypassed, merged) < 1e-4


OPTION_CASES = [("lora", {"dora": "out"}), ("lora", {"dora": "in"}), ("lora", {"use_tucker": True}),
                ("lora", {"use_scalar": True}), ("loha", {"use_tucker": True, "dora": "out"}),
                ("lokr", {"factor": 2, "decompose_both": True}), ("lokr", {"use_tucker": True}),
                ("glora", {"use_scalar": True}), ("diag-oft", {"constraint": 1e-2, "rescaled": True}),
                ("boft", {"rescaled": True}), ("ia3", {"on_input": True})]


@pytest.mark.parametrize("algo,options", OPTION_CASES, ids=lambda v: str(v))
def test_algorithm_options_start_at_zero_and_learn(algo, options):
    model, x = tiny_unet(), inputs()
    with torch.no_grad():
        base = model(x)
    with attached(build(model, algo, **options).pairs()), torch.no_grad():
        assert torch.allclose(model(x), base, atol=1e-5, rtol=0)
    _, losses = fit(model, algo, x, **options)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("algo", ALGOS)
def test_frozen_fp16_base(algo):
    model, x = tiny_unet(dtype=torch.float16), inputs(torch.float16)
    before = state(model)
    student, losses = fit(model, algo, x, steps=15)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 for a in student.adapters.values() for p in a.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_made_under_inference_mode():
    with torch.inference_mode():
        model = tiny_unet()
    x = inputs()
    student = build(model, "lora")
    trainer = Trainer(student.adapters, steps=2, lr=LR)
    with attached(student.pairs()):
        with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
            trainer.step(lambda: model(x).square().mean())
        with torch.inference_mode(False):
            assert autograd_safe(model) > 0
            assert not any(p.is_inference() for p in model.parameters())
            trainer.step(lambda: model(x).square().mean())
    with torch.inference_mode(), pytest.raises(RuntimeError):
        autograd_safe(model)


# ----- files: our reader, lycoris-lora, resume ---------------------------------------------------
def lycoris_reference(path, model, built):
    """The saved file run by lycoris-lora: (model output, per-layer merged weights) where it can."""
    ref_model, network = lycoris_applied(path, model)
    assert len(network.loras) == len(built.adapters)
    return ref_model


def module_reference(adapter, layer, algo, options):
    """lycoris-lora modules built directly and filled with `load_state_dict` (its file reload is
    broken for (IA)^3, full and input-axis DoRA in 3.3.0): the merged weight and bias it makes."""
    from lycoris.modules.full import FullModule
    from lycoris.modules.ia3 import IA3Module
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    layer = copy.deepcopy(layer)
    sd = adapter.export()
    if algo == "full":
        ref = FullModule("m", layer)
        ref.apply_to()
        ref.load_state_dict(sd)
        return ref.get_merged_weight()
    if algo == "ia3":
        ref = IA3Module("m", layer, train_on_input=bool(options.get("on_input")))
    else:
        cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
        ref = cls("m", layer, lora_dim=adapter.rank, alpha=adapter.alpha, weight_decompose=True,
                  wd_on_out=options["dora"] == "out", **{k: v for k, v in options.items() if k != "dora"})
    ref.load_state_dict(sd)
    x = torch.randn((3, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 6, 6))
    return x, reference_forward(ref, x)


FILE_CASES = [(a, {}) for a in ALGOS] + [("lora", {"dora": "out"}), ("lora", {"dora": "in"}),
                                         ("loha", {"dora": "in"}), ("lokr", {"use_tucker": True}),
                                         ("diag-oft", {"rescaled": True, "constraint": 1e-2})]
BY_MODULE = {"full", "ia3"}  # lycoris-lora cannot reload these files; compare module by module


@pytest.mark.parametrize("algo,options", FILE_CASES, ids=lambda v: str(v))
def test_saved_file_loads_identically_here_and_in_lycoris(algo, options, tmp_path):
    model, x = tiny_unet(), inputs()
    student, _ = fit(model, algo, x, steps=5, **options)
    freeze(student.adapters)
    path = str(tmp_path / "trained.safetensors")
    save_file(student.adapters, path)
    loaded = load_file(path, strict=True)
    assert set(loaded) == set(student.adapters)
    for name, adapter in loaded.items():
        w = student.modules[name].weight.detach()
        assert rel_err(adapter.merge(w, 1.0), student.adapters[name].merge(w, 1.0)) < 1e-6
    with torch.no_grad():
        ours = merged_copy(model, student)
        if algo in BY_MODULE or options.get("dora") == "in":
            for name, adapter in loaded.items():
                layer = student.modules[name]
                got = module_reference(adapter, layer, algo, options)
                spec = LayerSpec.from_module(layer)
                bias = None if layer.bias is None else adapter.merge_bias(layer.bias.detach(), 1.0)
                if algo == "full":
                    ref_w, ref_b = got
                    assert rel_err(adapter.merge(layer.weight.detach(), 1.0), ref_w) < 1e-5
                    assert ref_b is None or rel_err(bias, ref_b) < 1e-5
                else:
                    xin, ref_y = got
                    assert rel_err(spec.op(xin, adapter.merge(layer.weight.detach(), 1.0), bias), ref_y) < 1e-5
        else:
            assert rel_err(ours(x), lycoris_reference(path, model, student)(x)) < 1e-5


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_starts_from_the_saved_adapter(algo, tmp_path):
    model, x = tiny_unet(), inputs()
    student, losses = fit(model, algo, x, steps=8)
    freeze(student.adapters)
    path = str(tmp_path / "a.safetensors")
    save_file(student.adapters, path)
    saved = load_file(path)
    with attached([(student.modules[n], a) for n, a in saved.items()]), torch.no_grad():
        expected = model(x)
    lookup = {n: student.modules[n] for n in saved}
    resumed, missing = resume_adapters(saved, lookup)
    assert missing == [] and all(p.requires_grad for a in resumed.adapters.values() for p in a.parameters()
                                 if p.is_floating_point())
    outputs = []
    trainer = Trainer(resumed.adapters, steps=3, lr=LR)

    def loss():
        y = model(x)
        outputs.append(y.detach())
        return y.square().mean()

    with attached(resumed.pairs()):
        for _ in range(3):
            trainer.step(loss)
    assert rel_err(outputs[0], expected) < 1e-6
    assert rel_err(outputs[-1], expected) > 1e-6  # it does train
    # the loaded file's adapters are untouched (copies were trained)
    assert all(not p.requires_grad for a in saved.values() for p in a.parameters())
    reloaded = load_file(path)
    for n, a in saved.items():
        assert all(torch.equal(t, reloaded[n].export()[k]) for k, t in a.export().items())


def test_resume_reports_modules_the_model_lacks():
    model = tiny_unet()
    built = build(model, "lora")
    freeze(built.adapters)
    lookup = dict(list(built.modules.items())[:3])
    resumed, missing = resume_adapters(built.adapters, lookup)
    assert len(resumed.adapters) == 3 and len(missing) == len(built.adapters) - 3
    with pytest.raises(LycorisError, match="matches a layer"):
        resume_adapters(built.adapters, {})


# ----- loop pieces ---------------------------------------------------------------------------------
def test_no_weight_decay_on_magnitudes_rescale_scalars_and_dense_deltas():
    model = tiny_unet()
    for algo, options in (("lora", {"dora": "out", "use_scalar": True}), ("diag-oft", {"rescaled": True}),
                          ("full", {}), ("norm", {})):
        built = build(model, algo, **options)
        decayed = {id(p) for g in param_groups(built.adapters, 0.1) if g["weight_decay"] > 0
                   for p in g["params"]}
        for adapter in built.adapters.values():
            for name, p in adapter.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                no_decay = algo in ("full", "norm") or leaf in ("dora_scale", "rescale", "scalar")
                assert (id(p) in decayed) != no_decay, (algo, name)


def test_lr_schedules():
    assert [lr_factor(s, 10, "constant", 2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 10, "cosine", 2) for s in range(11)]
    assert cosine[:2] == [0.5, 1.0] and cosine[2] == 1.0 and cosine[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    with pytest.raises(LycorisError):
        lr_factor(0, 10, "linear")


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD", "RMSprop"])
def test_optimizers_reduce_the_loss(optimizer):
    model, x = tiny_unet(), inputs()
    teacher = build(model, "lora")
    perturb(teacher.adapters)
    with attached(teacher.pairs()), torch.no_grad():
        target = model(x)
    student = build(model, "lora")
    lr = {"SGD": 2.0, "RMSprop": 3e-3}.get(optimizer, LR)
    trainer = Trainer(student.adapters, steps=30, lr=lr, optimizer=optimizer, schedule="cosine",
                      warmup_steps=3, weight_decay=0.01, max_grad_norm=1.0,
                      optimizer_kwargs={"momentum": 0.9} if optimizer == "SGD" else None)
    with attached(student.pairs()):
        losses = [trainer.step(lambda: F.mse_loss(model(x), target)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.lr == pytest.approx(0.0, abs=1e-12)


def test_nan_loss_stops_before_any_update():
    model, x = tiny_unet(), inputs()
    built = build(model, "lora")
    before = {n: p.clone() for n, p in built.adapters[next(iter(built.adapters))].named_parameters()}
    trainer = Trainer(built.adapters, steps=1)
    with attached(built.pairs()), pytest.raises(LycorisError, match="step 1"):
        trainer.step(lambda: model(x).sum() * float("nan"))
    after = dict(built.adapters[next(iter(built.adapters))].named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def grads_with(model, built, x, regularizer, checkpoint, seed=5):
    for p in (p for a in built.adapters.values() for p in a.parameters()):
        p.grad = None
    torch.manual_seed(seed)
    blocks = checkpoint_blocks(model) if checkpoint else []
    with attached(built.pairs(), regularizer=regularizer), checkpointed(blocks):
        model(x).square().mean().backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for a in built.adapters.values() for p in a.parameters()]


def test_dropouts_change_training_only_and_replay_under_checkpointing():
    model, x = tiny_unet(), inputs()
    built = build(model, "lora")
    perturb(built.adapters)
    reg = Dropout(dropout=0.3, rank_dropout=0.3, module_dropout=0.3)
    with attached(built.pairs()), torch.no_grad():
        plain = model(x)
    with attached(built.pairs(), regularizer=reg), torch.no_grad():
        assert torch.equal(model(x), plain)  # inactive without grad (evaluation)
    with attached(built.pairs(), regularizer=reg):
        torch.manual_seed(0)
        assert not torch.allclose(model(x), plain)
    # checkpointed blocks replay the same random masks in backward: identical gradients
    for a, b in zip(grads_with(model, built, x, reg, False), grads_with(model, built, x, reg, True)):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(LycorisError):
        Dropout(dropout=1.0)


class InPlaceBlock(nn.Module):
    """A DiT-style block written for inference: the residual is added into its input in place."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, in_place: bool = True):
        h = self.fc(self.norm(x))
        if in_place:
            x += h
            return x
        return x + h


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_blocks_that_update_activations_in_place_train_exactly(checkpoint):
    torch.manual_seed(0)
    model = nn.Sequential(InPlaceBlock(8), InPlaceBlock(8))  # the first one's input needs no grad
    built = create_adapters(select_targets(Root(model), "custom", include="."), "lora", rank=2)
    perturb(built.adapters)
    x = torch.randn(3, 8)

    def grads(in_place: bool, guarded: bool):
        for p in (p for a in built.adapters.values() for p in a.parameters()):
            p.grad = None
        blocks = list(model) if checkpoint and guarded else []
        copies = activations_copied() if guarded else contextlib.nullcontext()
        with attached(built.pairs()), checkpointed(blocks), copies:
            h = x.clone()
            for block in model:
                h = block(h, in_place=in_place)
            h.square().sum().backward()
        return [p.grad.clone() for a in built.adapters.values() for p in a.parameters()]

    with pytest.raises(RuntimeError, match="inplace"):
        grads(in_place=True, guarded=False)
    for got, want in zip(grads(in_place=True, guarded=True), grads(in_place=False, guarded=False)):
        assert torch.allclose(got, want, atol=1e-6)


def test_attach_and_checkpoint_restore_forwards():
    model = tiny_unet()
    layer = model.conv_in
    layer.forward = lambda t: F.conv2d(t, layer.weight, layer.bias, padding=1)  # someone else's wrapper
    theirs = layer.forward
    built = build(model, "lora")
    with pytest.raises(ZeroDivisionError):
        with attached(built.pairs()), checkpointed(checkpoint_blocks(model)):
            assert model.conv_out.forward is not type(model.conv_out).forward
            raise ZeroDivisionError
    assert layer.forward is theirs
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not layer)


def test_checkpoint_blocks_open_containers():
    model = tiny_unet()
    blocks = checkpoint_blocks(model)
    kinds = [type(b).__name__ for b in blocks]
    assert kinds == ["Conv2d", "ResnetBlock2D", "Transformer2DModel", "Conv2d"]


def test_presets_have_descriptions():
    assert all(p.description for p in PRESETS.values())


def test_layers_an_algorithm_cannot_fit_are_left_out_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 6))  # BOFT cannot split 6 channels
    built = create_adapters(select_targets(Root(model), "custom", include="."), "boft", rank=4)
    assert list(built.adapters) == ["lora_unet_0"]
    assert built.ignored["cannot create"][0].startswith("lora_unet_1 (linear [6, 16])")
    with pytest.raises(LycorisError, match="fits none"):
        create_adapters(select_targets(Root(model), "custom", include="1"), "boft", rank=4)
    assert create_adapters(select_targets(Root(model), "custom", include="0"), "lora",
                           factor=4).ignored["options"] == ["factor"]
