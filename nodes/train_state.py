"""Periodic saves of a training run and the optimizer state beside them, for exact resumes."""
from __future__ import annotations

import logging
import os
import re

import torch

import folder_paths

from ..lycoris_core.save import save_file
from ..lycoris_core.train import Trainer
from ..lycoris_core.train.build import restore_scalar, scalar_parameters
from .train_objective import Objective

log = logging.getLogger("comfyui-lycoris")
NO_FILE = "[none]"  # the file widgets' "no file" choice

STATE_SUFFIX = ".optim.pt"
STATE_FORMAT = "comfyui-lycoris train state 1"


def state_path(adapter_path: str) -> str:
    """`x.safetensors` -> `x.optim.pt`: the optimizer state saved beside an adapter file."""
    return os.path.splitext(adapter_path)[0] + STATE_SUFFIX


def train_state(trainer: Trainer, objective: Objective, device: torch.device) -> dict:
    """Everything a resumed run needs to continue exactly: optimizer and schedule, the batch/noise
    draws, the global RNG that dropouts use, and the parameters of `use_scalar` adapters as trained
    (their file holds the scalar baked in) (tensors, numbers and lists only: loads with
    `torch.load(weights_only=True)`)."""
    state = {"format": STATE_FORMAT, "trainer": trainer.state_dict(), "objective": objective.state(),
             "rng": torch.get_rng_state(), "scalars": scalar_parameters(trainer.adapters)}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def load_train_state(resume_file) -> dict | None:
    """The optimizer state beside a `loras` file, or None when there is none."""
    if resume_file in (None, "", NO_FILE):
        return None
    path = state_path(folder_paths.get_full_path_or_raise("loras", resume_file))
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not an optimizer state written by LyCORIS Train")
    return state


def restore_scalars(state: dict, adapters: dict) -> None:
    """Put the trainable scalars of a saved run's `use_scalar` adapters back (before the trainer is
    made, so its optimizer holds them): the optimizer state continues that parameterisation."""
    for name, parameters in state.get("scalars", {}).items():
        if name in adapters:  # one this run does not train is refused by restore_train_state
            restore_scalar(adapters[name], parameters)


def restore_train_state(state: dict, trainer: Trainer, device: torch.device, steps: int) -> None:
    """Put a saved run's optimizer, schedule and RNG back (the objective's draws go to run_training)."""
    untrained = sorted(set(state["trainer"]["param_state"]) - set(trainer.named_parameters()))
    if untrained:
        raise ValueError(f"the optimizer state trains {len(untrained)} parameters that this run does not "
                         f"(first: {untrained[0]}): train the same modules as the saved run (text-encoder "
                         "ones need train_text_encoder and the clip), or switch resume_state off")
    trainer.load_state_dict(state["trainer"])
    if trainer.step_count >= steps:
        raise ValueError(f"the resumed run already trained {trainer.step_count} steps: with its optimizer "
                         f"state, steps counts the whole run, so set steps above {trainer.step_count} "
                         "(or switch resume_state off)")
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def next_run(folder: str, stem: str) -> int:
    """One above the highest run number of this prefix's checkpoints and sample previews in
    `folder`: a run's checkpoints and previews share it, and never reuse an earlier run's."""
    pattern = re.compile(re.escape(stem) + r"_(\d+)_(?:step\d+\.safetensors|sample_step\d+(?:_\d+)?\.png)$")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return 1 + max((int(m.group(1)) for f in names if (m := pattern.match(f))), default=0)


class Checkpoints:
    """`on_step` hook of run_training: every `every` steps the adapters (fp32) and their optimizer
    state, as `<prefix>_<run>_step<step>.safetensors` + `.optim.pt` in the host's output folder;
    <run> is one above the highest run already there, so nothing is overwritten."""

    def __init__(self, every: int, prefix: str, adapters: dict, trainer: Trainer, metadata, device):
        from .save import split_prefix

        folder, stem = split_prefix(prefix, folder_paths.get_output_directory(), "output")
        os.makedirs(folder, exist_ok=True)
        run = next_run(folder, stem)
        self.base = os.path.join(folder, f"{stem}_{run:05d}")
        self.every, self.adapters, self.trainer, self.metadata, self.device = every, adapters, trainer, metadata, device
        self.saved: list[str] = []

    def __call__(self, done: int, objective: Objective, model_wrap=None) -> None:
        if done % self.every:
            return
        path = f"{self.base}_step{done:06d}.safetensors"
        meta = self.metadata(done)
        title = os.path.splitext(os.path.basename(path))[0]
        meta.update({"ss_output_name": title, "modelspec.title": title})
        save_file(self.adapters, path, meta, dtype=torch.float32)
        tmp = state_path(path) + ".tmp"
        torch.save(train_state(self.trainer, objective, self.device), tmp)
        os.replace(tmp, state_path(path))
        self.saved.append(path)
        log.info("LyCORIS Train: saved step %d to %s", done, path)
