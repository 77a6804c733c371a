"""DyLoRA training (lycoris_core.train.dylora) against lycoris-lora's DyLoraModule as the oracle.

- For a fixed drawn number of blocks, our training forward equals lycoris-lora's module forward on
  Linear and Conv layers (fp32 exactly, bf16 within rounding), once its alpha is divided by the block
  size (it scales by alpha / blocks, we by alpha / rank: the deviation is pinned below), and the
  gradient reaches exactly the parameters lycoris-lora lets it reach (the last block used).
- The saved file is a plain LoRA; cut to any multiple of the block size it is the LoRA trained at that
  rank, loads in our reader and in lycoris-lora with the same result, and after training on a toy
  regression the loss falls as the rank grows.
- Activation checkpointing replays the draws; the optimiser moves only blocks that had a gradient.
- A DyLoRA-trained file resumes as DyLoRA (same parameter names, so optimiser state resumes too).
"""
from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lycoris_core import LayerSpec, LycorisError, load_file, save_file, standard_metadata
from lycoris_core.algos import detect
from lycoris_core.train import (DyLoRA, Root, Trainer, as_dylora, attached, checkpoint_blocks, checkpointed,
                                create_adapters, default_kinds, freeze, resume_adapters, select_targets,
                                trainable_algorithms, truncated)
from oracle import lycoris_applied, make_layer, rel_err, sample_input
from train_model import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 8, 3.0
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


def dylora(layer: nn.Module, block_size: int, seed: int = 2) -> DyLoRA:
    """A DyLoRA on `layer` with random non-zero blocks (a fresh one has up = 0)."""
    torch.manual_seed(seed)
    adapter = DyLoRA.create(LayerSpec.from_module(layer), rank=RANK, alpha=ALPHA, block_size=block_size)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, 0.2)
    return adapter


def lycoris_module(layer: nn.Module, ours: DyLoRA, alpha: float):
    """lycoris-lora's DyLoraModule on `layer` holding our blocks (its blocks are flattened to 2-D)."""
    from lycoris.modules.dylora import DyLoraModule

    ref = DyLoraModule("m", layer, lora_dim=ours.rank, alpha=alpha, block_size=ours.block_size)
    with torch.no_grad():
        for i in range(ours.blocks):
            ref.up_list[i].copy_(getattr(ours, f"up_{i}").reshape(ref.up_list[i].shape))
            ref.down_list[i].copy_(getattr(ours, f"down_{i}").reshape(ref.down_list[i].shape))
    return ref.to(layer.weight.dtype)


def seed_drawing(blocks: int, used: int) -> int:
    """A torch seed under which our forward draws `used` blocks."""
    for seed in range(1000):
        torch.manual_seed(seed)
        if int(torch.randint(1, blocks + 1, ())) == used:
            return seed
    raise AssertionError(f"no seed draws {used} of {blocks}")


def our_forward(adapter: DyLoRA, layer: nn.Module, x: torch.Tensor, used: int) -> torch.Tensor:
    torch.manual_seed(seed_drawing(adapter.blocks, used))
    return adapter.bypass(x, layer, 1.0, layer)


def their_forward(ref, x: torch.Tensor, used: int, monkeypatch) -> torch.Tensor:
    import lycoris.modules.dylora as module

    monkeypatch.setattr(module, "random", types.SimpleNamespace(randint=lambda lo, hi: used - 1))
    return ref(x)


CASES = [(kind, bs, used) for kind in ("linear", "conv3x3") for bs in (1, 2, 4) for used in (1, RANK // bs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,block_size,used", CASES, ids=lambda v: str(v))
def test_forward_and_gradient_match_lycoris_for_a_drawn_block(kind, block_size, used, dtype, monkeypatch):
    layer = make_layer(kind).to(dtype).requires_grad_(False)
    ours = dylora(layer, block_size)
    ref = lycoris_module(layer, ours, ALPHA / block_size)
    x = sample_input(layer).to(dtype)
    got = our_forward(ours, layer, x, used)
    want = their_forward(ref, x, used, monkeypatch)
    assert got.dtype == want.dtype == dtype
    assert rel_err(got.detach(), want.detach()) < TOL[dtype]
    assert rel_err(got.detach(), layer(x)) > 1e-3  # the adapter does change the output
    if dtype != torch.float32:
        return
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    last = used - 1
    for i in range(ours.blocks):
        for which, theirs in (("up", ref.up_list[i]), ("down", ref.down_list[i])):
            grad = getattr(ours, f"{which}_{i}").grad
            if i != last:
                assert grad is None and theirs.grad is None, (which, i)
            else:
                assert rel_err(grad.reshape(theirs.shape), theirs.grad) < 1e-5, (which, i)


def test_lycoris_scales_by_blocks_so_its_file_differs_from_its_training_and_ours_does_not(monkeypatch):
    """Pinned deviation: lycoris-lora 3.3 trains at alpha / blocks but saves alpha with the full
    rank (a reader applies alpha / rank): for block size 4 its file is 4x weaker than it trained.
    Ours trains at alpha / rank, so its full-rank training forward is exactly its file."""
    layer = make_layer("linear").requires_grad_(False)
    ours = dylora(layer, 4)
    ref = lycoris_module(layer, ours, ALPHA)
    x = sample_input(layer)
    base = layer(x)
    theirs_trained = their_forward(ref, x, ours.blocks, monkeypatch).detach() - base
    theirs_file = load_file_from(ref.custom_state_dict())["m"].bypass(x, layer, 1.0, layer) - base
    assert rel_err(theirs_trained, 4 * theirs_file) < 1e-5
    ours_trained = our_forward(ours, layer, x, ours.blocks).detach() - base
    ours_file = load_file_from(ours.export())["m"].bypass(x, layer, 1.0, layer) - base
    assert rel_err(ours_trained, ours_file) < 1e-6


def load_file_from(tensors: dict) -> dict:
    """Module "m" of a state dict, through our reader (written to a temporary file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/m.safetensors"
        save_file({f"m.{k}": v.detach().contiguous() for k, v in tensors.items()}, path)
        return dict(load_file(path, strict=True).items())


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_every_cut_of_the_saved_lora_is_the_lora_trained_at_that_rank(kind):
    layer = make_layer(kind).requires_grad_(False)
    ours = dylora(layer, 2)
    w = layer.weight.detach()
    for used in range(1, ours.blocks + 1):
        rank = used * ours.block_size
        cut = load_file_from(truncated(ours.export(), rank))["m"]
        assert cut.algo == "lora" and cut.rank == rank
        with torch.no_grad():
            p = ours.cut(used)
            trained = (p["up_mat"] @ p["down_mat"]).reshape(w.shape)
        assert rel_err(cut.merge(w, 1.0) - w, trained) < 1e-6, rank


def test_outside_training_it_is_the_full_rank_lora_it_saves():
    layer = make_layer("conv3x3").requires_grad_(False)
    ours = dylora(layer, 2)
    x = sample_input(layer)
    loaded = load_file_from(ours.export())["m"]
    with torch.no_grad():
        assert rel_err(ours.bypass(x, layer, 1.0, layer), loaded.bypass(x, layer, 1.0, layer)) < 1e-6
    freeze({"m": ours})
    assert rel_err(ours.merge(layer.weight, 0.7), loaded.merge(layer.weight, 0.7)) < 1e-6


# ----- training ------------------------------------------------------------------------------------
def inputs():
    return torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def build(model, algo, **options):
    targets = select_targets(Root(model), "full", kinds=default_kinds(algo))
    return create_adapters(targets, algo, rank=RANK, alpha=ALPHA, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DyLoRA (rank 8, blocks of 2) trained on a tiny UNet towards a rank-8 LoRA teacher; the saved
    file's path, the model, the input and the target."""
    model, x = tiny_unet(), inputs()
    teacher = build(model, "lora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in teacher.adapters.values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.15)
        with attached(teacher.pairs()):
            target = model(x)
    students = {}
    for algo, options in (("dylora", {"block_size": 2}), ("lora", {})):
        torch.manual_seed(0)
        student = build(model, algo, **options)
        assert student.ignored["options"] == [] and len(student.adapters) == len(teacher.adapters)
        trainer = Trainer(student.adapters, steps=80, lr=2e-2)
        with attached(student.pairs()):
            for _ in range(80):
                trainer.step(lambda: F.mse_loss(model(x), target))
        freeze(student.adapters)
        students[algo] = student
    folder = tmp_path_factory.mktemp("dylora")
    paths = {algo: str(folder / f"{algo}.safetensors") for algo in students}
    for algo, student in students.items():
        save_file(student.adapters, paths[algo], standard_metadata(student.adapters, network_args=(
            {"block_size": 2} if algo == "dylora" else {})))
    return paths, model, x, target, students["dylora"]


def cut_losses(path: str, model, x, target, modules, tmp_path) -> dict[int, float]:
    """Loss of the file cut to each rank (our reader, bypass), checked against lycoris-lora's loader."""
    full = load_file(path, strict=True)
    tensors = {f"{n}.{k}": v for n, a in full.items() for k, v in a.export().items()}
    losses = {}
    for rank in (2, 4, 6, 8):
        cut_path = str(tmp_path / f"{os.path.basename(path)[:-12]}_r{rank}.safetensors")
        save_file(truncated(tensors, rank, file=path), cut_path)
        cut = load_file(cut_path, strict=True)
        assert all(a.algo == "lora" and a.rank == rank for a in cut.values())
        with attached([(modules[n], a) for n, a in cut.items()]), torch.no_grad():
            ours = model(x)
        assert rel_err(ours, lycoris_output(cut_path, model, x)) < 1e-5, rank
        losses[rank] = float(F.mse_loss(ours, target))
    return losses


def lycoris_output(path: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The file applied by lycoris-lora's own loader."""
    ref_model, _ = lycoris_applied(path, model)
    with torch.no_grad():
        return ref_model(x)


def test_every_cut_of_a_trained_file_loads_alike_here_and_in_lycoris_and_more_rank_fits_better(trained, tmp_path):
    paths, model, x, target, student = trained
    full = load_file(paths["dylora"], strict=True)
    assert all(a.algo == "lora" and a.rank == RANK for a in full.values())
    args = full.metadata["ss_network_args"]
    assert '"algo": "dylora"' in args and '"block_size": "2"' in args
    with torch.no_grad():
        start = float(F.mse_loss(model(x), target))
    dy = cut_losses(paths["dylora"], model, x, target, student.modules, tmp_path)
    plain = cut_losses(paths["lora"], model, x, target, student.modules, tmp_path)
    ranks = sorted(dy)
    assert all(dy[b] < 1.05 * dy[a] for a, b in zip(ranks, ranks[1:])), dy
    assert dy[8] < dy[2] and dy[8] < 0.25 * start, (start, dy)
    # the point of DyLoRA: a plain LoRA trained alike is useless cut to rank 2, a DyLoRA is not
    assert dy[2] < 0.5 * plain[2] and dy[2] < 0.25 * start, (start, dy, plain)


def test_checkpointing_replays_the_draws_and_steps_move_only_blocks_with_a_gradient():
    model, x = tiny_unet(), inputs()
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        built = build(model, "dylora", block_size=2)
        with torch.no_grad():
            for a in built.adapters.values():
                for p in a.parameters():
                    p.normal_(0.0, 0.1)
        torch.manual_seed(5)
        blocks = checkpoint_blocks(model) if checkpoint else []
        with attached(built.pairs()), checkpointed(blocks):
            model(x).square().mean().backward()
        grads.append({f"{n}.{k}": p.grad for n, a in built.adapters.items() for k, p in a.named_parameters()})
    plain, replayed = grads
    assert {k for k, g in plain.items() if g is not None} == {k for k, g in replayed.items() if g is not None}
    assert all(rel_err(g, replayed[k]) < 1e-5 for k, g in plain.items() if g is not None)

    built = build(model, "dylora", block_size=2)
    before = {n: [p.detach().clone() for p in a.parameters()] for n, a in built.adapters.items()}
    trainer = Trainer(built.adapters, steps=1, lr=1e-2, weight_decay=0.1)
    with attached(built.pairs()):
        trainer.step(lambda: model(x).square().mean())
    drawn = set()
    for name, a in built.adapters.items():
        changed = [k for (k, p), old in zip(a.named_parameters(), before[name]) if not torch.equal(p, old)]
        assert len({k.split("_")[1] for k in changed}) == 1, (name, changed)  # one block per module
        drawn.add(changed[0].split("_")[1])
    assert len(drawn) > 1  # modules draw independently


def test_dylora_is_offered_for_training_only_and_checks_its_block_size():
    assert "dylora" in trainable_algorithms()
    assert detect({"lora_up.weight": (4, 2), "lora_down.weight": (2, 4)}).algo == "lora"
    model = tiny_unet()
    with pytest.raises(LycorisError, match="not a multiple of the DyLoRA block size 3"):
        build(model, "dylora", block_size=3)
    built = build(model, "dylora", block_size=4, use_tucker=True, dora="out")
    assert built.ignored["options"] == ["dora", "use_tucker"]
    assert {a.blocks for a in built.adapters.values()} == {2}
    tensors = {f"m.{k}": v for k, v in next(iter(built.adapters.values())).export().items()}
    with pytest.raises(LycorisError, match="rank 8, cannot cut it to rank 10"):
        truncated(tensors, 10)


def test_resuming_a_dylora_file_goes_on_as_dylora_with_the_same_parameters(trained):
    paths, model, x, _, student = trained
    saved = load_file(paths["dylora"], strict=True)
    lookup = {n: student.modules[n] for n in saved}
    resumed, missing = resume_adapters(saved, lookup)
    assert missing == []
    adapters = as_dylora(resumed.adapters, saved.metadata)
    assert {type(a) for a in adapters.values()} == {DyLoRA} and {a.block_size for a in adapters.values()} == {2}
    for name, a in adapters.items():  # the names a fresh run's optimizer state is keyed by
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in student.adapters[name].named_parameters()]
        assert all(p.requires_grad for p in a.parameters())
        w = student.modules[name].weight
        with torch.no_grad():  # (with grad, a trainable DyLoRA draws a cut)
            assert rel_err(a.merge(w, 1.0), saved[name].merge(w, 1.0)) < 1e-6
    # a file without DyLoRA metadata resumes as the LoRA it is; one whose ranks do not fit is refused
    assert {type(a) for a in as_dylora(resumed.adapters, {}).values()} == {type(next(iter(saved.values())))}
    with pytest.raises(LycorisError, match="rank 8 is not a multiple of the DyLoRA block size 3"):
        as_dylora(resumed.adapters, {"ss_network_args": '{"algo": "dylora", "block_size": "3"}'})
