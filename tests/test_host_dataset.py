"""LyCORIS Dataset and bucketed training inside a real ComfyUI, on the random SD1.5 checkpoint.

A folder of four small PNGs, two square and two 2:1, with captions; buckets for 64^2 pixels in
steps of 16 put them at 64x64 and 80x48. The host's own nodes are the oracles: VAE Encode on the
image resized and cropped by hand, CLIP Text Encode on the caption. LyCORIS Train then runs two
steps with the adapters on the UNet's last block (backward stops there), and a wrapper on the
host's UNet call records what each step fed the model.
"""
from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch
from PIL import Image

from host.helpers import pack_module

BUCKETS_KEY = "lycoris_buckets"  # the LATENT key of the buckets after the first (the documented format)
RES = dict(resolution=64, bucket_step=16, min_side=32, max_side=128)
SQUARE, WIDE = (8, 8), (6, 10)  # latent (h, w) of the 64x64 and 80x48 buckets
IMAGES = {"a.png": ((64, 64), "a red square"), "b.png": ((96, 96), "a blue square"),
          "c.png": ((128, 64), "a wide green field"), "d.png": ((64, 32), None)}  # d: no caption file
LATE_BLOCK = "up_blocks_3_attentions_2"

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_and_unloaded")


def write_image(path, size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_folder(path, names=tuple(IMAGES)):
    path.mkdir()
    for k, (name, (size, caption)) in enumerate(IMAGES.items()):
        if name in names:
            write_image(path / name, size, k)
            if caption is not None:
                (path / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def D(lycoris_pack):
    return pack_module("nodes.dataset")


@pytest.fixture(scope="module")
def inputs_module(lycoris_pack):
    """What LyCORIS Train reads as its images: the bucketed LATENT and the host's lists."""
    return pack_module("nodes.train_inputs")


@pytest.fixture(scope="module")
def host_models(sd15_checkpoint):
    """(MODEL, CLIP, VAE) of a private load: training replaces the model's inference-mode weights."""
    import nodes

    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(sd15_checkpoint))


def counting(vae, monkeypatch) -> list:
    """The VAE with its encode calls counted (one list item per call)."""
    calls = []
    original = vae.encode

    def encode(pixels):
        calls.append(tuple(pixels.shape))
        return original(pixels)

    monkeypatch.setattr(vae, "encode", encode)
    return calls


def load(D, folder, vae, clip, cache, **kw):
    with torch.inference_mode():
        return D.LycorisDataset().load(str(folder), vae, clip, cache_folder=str(cache), **{**RES, **kw})


@pytest.fixture(scope="module")
def dataset(D, host_models, tmp_path_factory):
    """The four-image folder, its cache folder, the node's first output and its VAE calls."""
    root = tmp_path_factory.mktemp("dataset")
    folder, cache = make_folder(root / "images"), root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        calls = counting(host_models[2], mp)
        out = load(D, folder, host_models[2], host_models[1], cache)
    return folder, cache, out, calls


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


# ----- the dataset node -------------------------------------------------------------------------
def test_images_are_bucketed_and_captions_follow_the_bucket_order(D, host_models, dataset):
    import nodes

    from comfyui_lycoris_under_test import nodes as pack_nodes

    assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS["LycorisDataset"] == "LyCORIS Dataset"

    clip = host_models[1]
    latent, conditioning, captions = dataset[2]
    buckets = latent[BUCKETS_KEY]
    assert [tuple(b.shape) for b in buckets] == [(2, 4) + SQUARE, (2, 4) + WIDE]
    assert latent["samples"] is buckets[0]
    assert captions.split("\n") == ["a red square", "a blue square", "a wide green field", ""]
    assert len(conditioning) == 4
    with torch.inference_mode():
        for entry, text in zip(conditioning, captions.split("\n")):
            expected = nodes.CLIPTextEncode().encode(clip, text)[0]
            assert torch.equal(entry[0], expected[0][0])
            assert torch.equal(entry[1]["pooled_output"], expected[0][1]["pooled_output"])


def test_latents_equal_the_hosts_vae_encode_of_the_cropped_image(D, host_models, dataset):
    import nodes

    vae = host_models[2]
    folder, cache, (latent, _, _), calls = dataset
    assert calls == [(1, 64, 64, 3), (1, 64, 64, 3), (1, 48, 80, 3), (1, 48, 80, 3)]
    with torch.inference_mode():
        # c.png 128x64 -> 2:1 bucket 80x48: resized to 96x48 (covers it), 8 pixels cut off each side
        wide = Image.open(folder / "c.png").resize((96, 48), Image.Resampling.LANCZOS).crop((8, 0, 88, 48))
        # b.png 96x96 -> 64x64: resized, nothing cut
        square = Image.open(folder / "b.png").resize((64, 64), Image.Resampling.LANCZOS)
        want_wide = nodes.VAEEncode().encode(vae, pixels(wide))[0]["samples"]
        want_square = nodes.VAEEncode().encode(vae, pixels(square))[0]["samples"]
    buckets = latent[BUCKETS_KEY]
    assert torch.equal(buckets[1][0], want_wide[0])
    assert torch.equal(buckets[0][1], want_square[0])
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 4 and not list(folder.glob("*.safetensors"))  # nothing beside the images
    from safetensors.torch import load_file

    assert any(torch.equal(load_file(str(f))["latent"], want_wide) for f in files)


def test_a_second_run_reads_the_cache_and_a_changed_image_or_vae_encodes_again(D, host_models, dataset,
                                                                              tmp_path, monkeypatch):
    import comfy.sd

    _, clip, vae = host_models
    folder, cache, (first, _, _), _ = dataset
    calls = counting(vae, monkeypatch)
    again = load(D, folder, vae, clip, cache)[0]
    assert calls == []  # no VAE call: every latent came from the cache
    assert all(torch.equal(x, y) for x, y in zip(first[BUCKETS_KEY], again[BUCKETS_KEY]))

    copy = make_folder(tmp_path / "copy")
    signature = D.LycorisDataset.IS_CHANGED(str(copy))
    write_image(copy / "c.png", (128, 64), 99)
    assert D.LycorisDataset.IS_CHANGED(str(copy)) != signature
    changed = load(D, copy, vae, clip, cache)[0]
    assert calls == [(1, 48, 80, 3)]  # only the changed image
    assert not torch.equal(changed[BUCKETS_KEY][1][0], first[BUCKETS_KEY][1][0])
    assert torch.equal(changed[BUCKETS_KEY][1][1], first[BUCKETS_KEY][1][1])

    with torch.inference_mode():
        weights = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
        weights["encoder.conv_in.bias"] += 0.01
        other = comfy.sd.VAE(sd=weights)
    other_calls = counting(other, monkeypatch)
    load(D, make_folder(tmp_path / "one", names=("a.png",)), other, clip, cache)
    assert other_calls == [(1, 64, 64, 3)]  # another VAE: encoded again


def test_without_the_cache_nothing_is_written_and_bad_settings_are_named(D, host_models, tmp_path):
    _, clip, vae = host_models
    one = make_folder(tmp_path / "one", names=("d.png",))
    latent, conditioning, captions = load(D, one, vae, clip, tmp_path / "c", cache_latents=False)
    assert not (tmp_path / "c").exists()
    assert BUCKETS_KEY not in latent and tuple(latent["samples"].shape) == (1, 4) + WIDE  # one size: plain
    assert captions == "" and len(conditioning) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        load(D, one, vae, clip, tmp_path / "c", bucket_step=12)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load(D, tmp_path / "missing", vae, clip, tmp_path / "c")


# ----- training on buckets ----------------------------------------------------------------------
def watched(model) -> tuple:
    """A clone of the model whose UNet calls record their latent shape and cross-attention rows
    (a closure: model options are deep-copied with every clone, functions are shared)."""
    calls = []

    def wrapper(apply_model, args):
        calls.append((tuple(args["input"].shape), args["c"]["c_crossattn"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


def train_args(model, latent, conditioning, **kw):
    args = dict(model=model, latents=latent, conditioning=conditioning, algorithm="lora", preset="custom",
                rank=4, alpha=4.0, conv_rank=0, conv_alpha=1.0, steps=2, batch_size=2, learning_rate=1e-3,
                optimizer="AdamW", lr_schedule="constant", warmup_steps=0, seed=4,
                gradient_checkpointing=False, training_dtype="auto", include_regex=LATE_BLOCK)
    args.update(kw)
    return args


def assert_batches_follow_buckets(calls, square, wide, buckets_seen=2):
    """Every call is one whole bucket (batch 2) with that bucket's captions (`square`, `wide`: its
    conditioning entries); `buckets_seen` buckets trained."""
    per_bucket = {(2, 4) + SQUARE: [e[0] for e in square], (2, 4) + WIDE: [e[0] for e in wide]}
    seen = set()
    for shape, cross in calls:
        assert shape in per_bucket, shape
        own = per_bucket[shape]
        width = cross.shape[1]
        for row in cross:  # a permutation of the bucket's own captions (repeated to a common length)
            assert any(torch.equal(row[:c.shape[1]], c[0]) for c in own if c.shape[1] <= width)
        seen.add(shape)
    assert len(seen) == buckets_seen


def test_lycoris_train_draws_each_batch_from_one_bucket(D, host_models, dataset, monkeypatch):
    latent, conditioning, captions = dataset[2]
    model, calls = watched(host_models[0])
    train = pack_module("nodes.train")
    O = pack_module("nodes.train_objective")
    seen = []
    loss_of = O.Objective.loss

    def loss(self, model_wrap, extra_args, x0_all, *args, **kwargs):
        seen.append([x.detach().clone() for x in x0_all])
        return loss_of(self, model_wrap, extra_args, x0_all, *args, **kwargs)

    monkeypatch.setattr(O.Objective, "loss", loss)
    with torch.inference_mode():
        _, lycoris, loss, _ = train.LycorisTrain().train(**train_args(model, latent, conditioning,
                                                                      captions=captions))
    assert len(loss["loss"]) == 2 and all(np.isfinite(loss["loss"]))
    assert_batches_follow_buckets(calls, conditioning[:2], conditioning[2:])
    # every bucket reaches the loss as the host's sampler prepares its latent (the first one) does
    latent_in = host_models[0].model.process_latent_in
    for got, raw in zip(seen[0], latent[BUCKETS_KEY]):
        assert torch.allclose(got, latent_in(raw.float()), rtol=1e-6, atol=0)
    assert lycoris.metadata["ss_num_train_images"] == "4" and lycoris.metadata["ss_enable_bucket"] == "True"
    assert '"resolution": [80, 48], "count": 2' in lycoris.metadata["ss_bucket_info"]


def test_the_hosts_list_inputs_train_as_one_bucketed_run(D, host_models, dataset):
    """The host calls a node with INPUT_IS_LIST once with every input in a list: per-image LATENTs
    and CONDITIONINGs (as the v0.8+ dataset nodes give them) train as buckets, in one run."""
    import execution

    latent, conditioning, captions = dataset[2]
    per_image = [{"samples": b[i:i + 1]} for b in latent[BUCKETS_KEY] for i in range(b.shape[0])]
    order = [2, 0, 3, 1]  # interleaved sizes, as a folder listing gives them
    model, calls = watched(host_models[0])
    train = pack_module("nodes.train")
    inputs = {k: [v] for k, v in train_args(model, None, None, steps=1).items()}
    inputs.update(latents=[per_image[i] for i in order], conditioning=[[conditioning[i]] for i in order],
                  captions=[captions.split("\n")[i] for i in order], unique_id=["7"])
    with torch.inference_mode():
        results = asyncio.run(execution._async_map_node_over_list("p", "7", train.LycorisTrain(), inputs, "run"))
    assert len(results) == 1  # one run for the whole list, not one per image
    lycoris, loss = results[0][1], results[0][2]
    assert len(loss["loss"]) == 1
    assert_batches_follow_buckets(calls, conditioning[:2], conditioning[2:], buckets_seen=1)
    assert lycoris.metadata["ss_num_train_images"] == "4"


def test_host_lists_are_merged_by_size_with_conditioning_and_captions_in_step(inputs_module):
    t = [torch.full((1, 4, 8, 8), 0.0), torch.full((1, 4, 6, 10), 1.0), torch.full((2, 4, 8, 8), 2.0)]
    inputs = {"model": ["m"], "latents": [{"samples": x} for x in t], "conditioning": [["c0"], ["c1"], ["c2", "c3"]],
              "captions": ["zero\none", "two\nthree"], "steps": [5]}
    out = inputs_module.from_host_lists(inputs)
    buckets = inputs_module.latent_buckets(out["latents"])
    assert [b[:, 0, 0, 0].tolist() for b in buckets] == [[0.0, 2.0, 2.0], [1.0]]
    assert out["conditioning"] == ["c0", "c2", "c3", "c1"]
    assert out["captions"].split("\n") == ["zero", "two", "three", "one"]
    assert out["model"] == "m" and out["steps"] == 5
    direct = {"model": object(), "latents": {"samples": t[0]}}
    assert inputs_module.from_host_lists(direct) is direct
    shared = inputs_module.from_host_lists({"model": ["m"], "latents": [{"samples": t[2]}, {"samples": t[1]}],
                                "conditioning": [["x"], ["y"]]})
    assert shared["conditioning"] == ["x", "x", "y"]
    with pytest.raises(ValueError, match="3 entries"):
        inputs_module.from_host_lists({"model": ["m"], "latents": [{"samples": t[2]}, {"samples": t[1]}, {"samples": t[0]}],
                           "conditioning": [["x", "y"], ["z"]]})


def test_the_hosts_own_dataset_nodes_lists_merge_into_buckets(inputs_module, host_models, dataset):
    """v0.8+: Make Training Dataset (a LATENT and a CONDITIONING per image) and Resolution Bucket
    (per size) as LyCORIS Train receives them: the same images and captions, grouped by size."""
    core = pytest.importorskip("comfy_extras.nodes_dataset")
    if not hasattr(core, "ResolutionBucket"):
        pytest.skip("this ComfyUI has no dataset nodes (Make Training Dataset, Resolution Bucket)")
    _, clip, vae = host_models
    folder = dataset[0]
    images = [pixels(Image.open(folder / n)) for n in ("a.png", "d.png")]
    images.append(pixels(Image.open(folder / "b.png").resize((64, 64), Image.Resampling.LANCZOS)))
    texts = ["first", "second", "third"]
    with torch.inference_mode():
        made = core.MakeTrainingDataset.execute(images, [vae], [clip], texts)
        latents, conds = made.result if hasattr(made, "result") else made
        bucketed = core.ResolutionBucket.execute(latents, conds)
        by_size = bucketed.result if hasattr(bucketed, "result") else bucketed
    for lists in ((latents, conds), by_size):
        out = inputs_module.from_host_lists({"model": ["m"], "latents": list(lists[0]), "conditioning": list(lists[1]),
                                 "captions": texts})
        buckets = inputs_module.latent_buckets(out["latents"])
        assert [tuple(b.shape) for b in buckets] == [(2, 4, 8, 8), (1, 4, 4, 8)]
        assert torch.equal(buckets[0], torch.cat([latents[0]["samples"], latents[2]["samples"]]))
        assert torch.equal(buckets[1], latents[1]["samples"])
        assert [e[0] is c[0][0] for e, c in zip(out["conditioning"], (conds[0], conds[2], conds[1]))] == [True] * 3
        if lists is not by_size:
            assert out["captions"].split("\n") == ["first", "third", "second"]


def test_a_resumed_objective_draws_the_same_buckets_batches_and_noise(host_models, tmp_path):
    """What a .optim.pt keeps of the objective (generator, every bucket's order) continues the draws
    exactly, through torch.save/load(weights_only=True) as the resume state is stored."""
    O = pack_module("nodes.train_objective")
    ms = host_models[0].get_model_object("model_sampling")
    parts = [torch.zeros(3, 4, 8, 8), torch.zeros(2, 4, 6, 10), torch.zeros(4, 4, 4, 8)]

    def draws(objective, n):
        out = []
        for _ in range(n):
            objective._draw(parts, ms, "epsilon")
            out.append([(idx, bucket, local, noise.clone(), sigma.clone())
                        for idx, bucket, local, noise, sigma, _ in objective.batches])
        return out

    whole = O.Objective([3, 2, 4], 2, 11, O.ObjectiveOptions(accumulation=2))
    draws(whole, 5)
    torch.save(whole.state(), tmp_path / "state.pt")
    rest = draws(whole, 6)
    resumed = O.Objective([3, 2, 4], 2, 0, O.ObjectiveOptions(accumulation=2))
    resumed.load_state(torch.load(tmp_path / "state.pt", weights_only=True))
    again = draws(resumed, 6)
    assert len({b[0][1] for b in rest}) > 1  # several buckets drawn
    for step_a, step_b in zip(rest, again):
        for (i, k, loc, n, s), (i2, k2, loc2, n2, s2) in zip(step_a, step_b):
            assert (i, k, loc) == (i2, k2, loc2) and torch.equal(n, n2) and torch.equal(s, s2)
            assert tuple(n.shape[1:]) == tuple(parts[k].shape[1:])
            assert all(0 <= j < parts[k].shape[0] for j in loc)
    with pytest.raises(ValueError, match="3 image size bucket"):
        O.Objective([5, 4], 2, 0).load_state(torch.load(tmp_path / "state.pt", weights_only=True))
