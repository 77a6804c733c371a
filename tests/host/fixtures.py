"""pytest fixtures for host tests; tests/conftest.py re-exports them."""
from __future__ import annotations

import os
import warnings

import pytest

from . import host


@pytest.fixture(scope="session")
def comfy_host():
    """The ComfyUI checkout, imported for CPU; skips the test when it is absent or broken."""
    reason = host.missing_reason()
    if reason:
        pytest.skip(reason)
    try:
        return host.import_host()
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {host.comfyui_path()} cannot be imported: {exc}")


@pytest.fixture(scope="session")
def lycoris_pack(comfy_host):
    """This repository imported as a custom node pack inside the host."""
    return host.import_pack()


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_host):
    """Path of the cached random SD1.5 checkpoint (built once per machine)."""
    import folder_paths

    from .checkpoint import cache_dir, ensure_checkpoint

    path = ensure_checkpoint()
    folder_paths.add_model_folder_path("checkpoints", cache_dir())
    folder_paths.add_model_folder_path("diffusion_models", cache_dir())
    return path


@pytest.fixture(scope="session")
def sd15(sd15_checkpoint):
    """(MODEL, CLIP, VAE) from the host's own checkpoint loader node."""
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(sd15_checkpoint))


@pytest.fixture(scope="session")
def loras_dir(comfy_host, tmp_path_factory):
    """A fresh folder registered as a `loras` folder of the host."""
    import folder_paths

    path = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(path))
    return path


@pytest.fixture(scope="module")
def originals(sd15):
    """Copies of the checkpoint's weights, to check that nothing was modified in place."""
    from .helpers import Originals

    return Originals(sd15[0], sd15[1])


@pytest.fixture
def quiet_warnings():
    """Reader warnings (legacy layouts, skipped layers) are tested elsewhere: silence them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def quiet_and_unloaded(lycoris_pack):
    """The pack imported, warnings silenced, and every model unloaded after the test."""
    from .helpers import unload_all

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    unload_all()


@pytest.fixture(scope="session")
def gguf_unet(comfy_host, sd15, tmp_path_factory):
    """The test UNet as a Q8_0 GGUF file, loaded by ComfyUI-GGUF's own loader (skips without it)."""
    import folder_paths

    from . import gguf

    reason = gguf.missing_reason(comfy_host)
    if reason:
        pytest.skip(reason)
    nodes = gguf.import_nodes(comfy_host)
    folder = tmp_path_factory.mktemp("unet_gguf")
    gguf.write_unet(sd15[0], str(folder / gguf.FILE_NAME))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    folder_paths.folder_names_and_paths["unet_gguf"][0].append(str(folder))
    return nodes.UnetLoaderGGUF().load_unet(gguf.FILE_NAME)[0]


@pytest.fixture(scope="module")
def T(lycoris_pack):
    """The pack's training node module (nodes/train.py) as the host imported it."""
    from comfyui_lycoris_under_test.nodes import train

    return train


@pytest.fixture
def fixed_batches(T, monkeypatch):
    """Every training step sees the same images, noise and noise level: a deterministic target."""
    from comfyui_lycoris_under_test.nodes import train_objective as objective

    original = objective.Objective.loss

    def loss(self, *args, **kwargs):
        self.g.manual_seed(1234)
        self.order = []
        return original(self, *args, **kwargs)

    monkeypatch.setattr(objective.Objective, "loss", loss)


@pytest.fixture
def loras_first(loras_dir, monkeypatch):
    """Make the test folder the first `loras` folder (where Save LyCORIS writes)."""
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["loras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(loras_dir)] + [p for p in paths if p != str(loras_dir)], exts))
    return loras_dir
