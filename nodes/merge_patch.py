"""Merge mode: our adapters as ComfyUI weight adapters, patched by the host at load time.

The host calls `calculate_weight` with a float working copy of the weight (or of its slice when
the patch has an offset) on the device it chose, also on every forward under lowvram and for GGUF.
We write the patched values into that tensor in place (the host discards our return value when an
offset is used) and let exceptions through: a patch that cannot be applied must not pass silently.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from comfy.weight_adapter import WeightAdapterBase

from ..lycoris_core import LycorisError
from .host_compat import stored_float_dtype


def _is_identity(function, like: torch.Tensor) -> bool:
    """Whether the host's `function` (applied to the scaled change) leaves a tensor as it is."""
    if function is None:
        return True
    probe = like.new_zeros(0)
    try:
        return function(probe) is probe
    except Exception:  # noqa: BLE001 - a transform that rejects an empty tensor is not the identity
        return False


@dataclass(frozen=True)
class PatchSpec:
    """The non-tensor part of a patch: which adapter (a template whose tensors may be replaced)
    and which module of the file. Rides as the last element of the patch's `weights`."""

    template: object  # lycoris_core Adapter
    module_name: str
    store_dtype: torch.dtype | None = None  # the model's plain float weight dtype: results must fit


class _Patch(WeightAdapterBase):
    """Common state of our weight and bias patches.

    Follows the host's adapter contract: the constructor takes `(loaded_keys, weights)`, every
    tensor is in `weights` (the adapter's own tensors, then the `PatchSpec`), and the rest derives
    from them, so a host may rebuild the patch as `type(p)(p.loaded_keys, <weights moved>)`.
    """

    def __init__(self, loaded_keys, weights):
        weights = tuple(weights)
        spec = weights[-1] if weights else None
        if not isinstance(spec, PatchSpec):
            raise LycorisError(f"{type(self).__name__} weights must end with a PatchSpec, got "
                               f"{type(spec).__name__}")
        self.loaded_keys = loaded_keys
        self.weights = weights
        self.module_name = spec.module_name
        self.store_dtype = spec.store_dtype
        self.adapter = spec.template.with_tensors(weights[:-1])
        self.name = f"lycoris:{self.adapter.algo}"

    @classmethod
    def of(cls, adapter, module_name: str, store_dtype: torch.dtype | None = None) -> "_Patch":
        return cls(set(), (*adapter.tensor_values(), PatchSpec(adapter, module_name, store_dtype)))

    def calculate_shape(self, key):  # newer hosts: our patches never change a weight's shape
        return None

    def _patched(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, *host_args,
                         **host_kwargs):
        """The host's hook. `weight` is already narrowed to `offset` and scaled by `strength_model`;
        later host arguments (intermediate dtype, original weights, device mesh) are not needed:
        our math is fp32 whatever the working dtype."""
        return self._write(weight, strength, function)

    def _write(self, weight: torch.Tensor, strength: float, function) -> torch.Tensor:
        if strength == 0:
            return weight
        with torch.no_grad():
            if _is_identity(function, weight):
                new = self._patched(weight, strength)
                if new is not weight:
                    weight.copy_(new)
            else:
                new = self._patched(weight.clone(), strength)
                weight += function(new.to(weight.dtype) - weight).to(weight.dtype)
        return weight

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.adapter.algo} {self.module_name}>"


class LycorisWeightPatch(_Patch):
    """`W <- W + m * D(W)` through the adapter's own fp32 merge, in place. A result that is not
    finite or does not fit the model's weight dtype raises (naming file and module); the host
    then keeps the model's weight, since it only stores our working copy after we return."""

    def _patched(self, weight, strength):
        try:
            return self.adapter.merge(weight, strength, inplace=True, store_dtype=self.store_dtype)
        finally:
            # prepared factors live on the patch device: do not keep them there after patching
            self.adapter.clear_cache()


class LycorisBiasPatch(_Patch):
    """`b <- merge_bias(b, m)` for algorithms that change the bias (diff_b, b_norm)."""

    def _patched(self, weight, strength):
        new = self.adapter.merge_bias(weight, strength)
        if new is None or tuple(new.shape) != tuple(weight.shape):
            raise LycorisError(f"bias patch produced {None if new is None else list(new.shape)} "
                               f"for a bias of shape {list(weight.shape)}",
                               file=getattr(self.adapter, "file", None), key=self.module_name)
        return new


def add_merge_patches(patcher, items: Iterable[tuple], part_label: str) -> int:
    """Add `(target, strength, with_bias)` items to a ModelPatcher (or CLIP), one call per strength.

    Raises when the host refuses a key: every key was checked against the model beforehand, so a
    refusal means the model changed under us and the result would be half-patched.
    """
    # one add_patches call takes one patch per key: several modules on one key (two spellings of a
    # name, a fused weight's slices) go into successive calls, which the host applies in order
    batches: list[tuple[float, dict]] = []
    last: dict = {}  # key -> index of the last batch that patches it
    for target, strength, with_bias in items:
        store = stored_float_dtype(patcher.model, target.key)
        patches = {target.patch_key: LycorisWeightPatch.of(target.adapter, target.name, store)}
        if with_bias:
            patches[target.bias_patch_key] = LycorisBiasPatch.of(target.adapter, target.name)
        after = max((last[k] for k in patches if k in last), default=-1)
        index = next((i for i in range(after + 1, len(batches)) if batches[i][0] == strength), None)
        if index is None:
            batches.append((strength, {}))
            index = len(batches) - 1
        batches[index][1].update(patches)
        last.update(dict.fromkeys(patches, index))
    count = 0
    for strength, patches in batches:
        accepted = set(patcher.add_patches(patches, strength))
        refused = [k for k in patches if k not in accepted]
        if refused:
            raise LycorisError(f"the {part_label} refused {len(refused)} patch keys, e.g. {refused[0]!r}")
        count += len(patches)
    return count
