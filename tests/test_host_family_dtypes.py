"""DiT weights stored in bf16 / fp16: a PEFT file merged by our loader is no further from the exact
result than core's merge of the same file (issue 11: "bf16/fp16 no worse than core").

Exact result: the stored low-precision base weight, upcast, plus PEFT's own delta in fp32. Both
loaders then round to the stored dtype, so each is at most about one rounding step away from it;
where core patches nothing (diffusers Wan names) ours must still be within that one step.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as read_safetensors

from host import dit, peft_files
from host.dit_checks import changed_keys, core, expected_change, merged_weights, ours, targets_of, tiny
from host.helpers import unload_all

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")

FAMILIES = ("flux", "sd3", "wan21")  # Wan: core lands none of a diffusers file (ours: one rounding step)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_MODELS: dict = {}


def tiny_in(family: str, dtype: torch.dtype):
    if (family, dtype) not in _MODELS:
        _MODELS[(family, dtype)] = dit.load(family, dtype=dtype)
    return _MODELS[(family, dtype)]


def exact_weights(model, twin, path: str, strength: float) -> dict[str, torch.Tensor]:
    """The stored base weights in fp32 with PEFT's delta times strength added at each target."""
    exact = merged_weights(model)
    for t in targets_of(model, path)[0]:
        key = t.key[len("diffusion_model."):]
        rows = slice(None) if t.offset is None else slice(t.offset[1], t.offset[1] + t.offset[2])
        exact[key][rows] += expected_change(t, twin, strength).reshape(exact[key][rows].shape)
    return exact


def ulps_off(value: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest distance of `value` from `exact`, in units of the last place of `dtype` at `exact`."""
    tiny_normal = torch.finfo(dtype).tiny
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(tiny_normal))))
    return float(((value - exact).abs() / ulp).max())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_merge_is_no_worse_than_core(family, dtype, tmp_path):
    model = tiny_in(family, DTYPES[dtype])
    stored = {v.dtype for v in model.model.diffusion_model.state_dict().values() if v.is_floating_point()}
    assert DTYPES[dtype] in stored, f"the host did not store {family} in {dtype}: {stored}"
    path = str(tmp_path / f"{family}.safetensors")
    twin = peft_files.peft_lora_file(family, path, tiny(family))
    tensors = read_safetensors(path)
    base = merged_weights(model)
    for strength in (1.0, -0.5):
        exact = exact_weights(model, twin, path, strength)
        got_model, _, report = ours(model, path, strength, "merge")
        got = merged_weights(got_model)
        unload_all()
        core_model, _ = core(model, tensors, strength)
        by_core = merged_weights(core_model)
        unload_all()
        by_core_keys = set(changed_keys(base, by_core))
        changed = changed_keys(base, got)
        assert by_core_keys <= set(changed), "a weight core patches is left unpatched by ours"
        for k in changed:
            ours_err = ulps_off(got[k], exact[k], DTYPES[dtype])
            core_err = ulps_off(by_core[k], exact[k], DTYPES[dtype]) if k in by_core_keys else 0.0
            # a single rounding to the stored dtype is at most one unit in the last place
            assert ours_err <= max(core_err, 1.0), (
                f"{k} at {strength}: ours {ours_err:.2f} vs core {core_err:.2f} units in the last "
                f"place off the exact merge\n{report}")
