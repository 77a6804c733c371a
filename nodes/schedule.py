"""Strength over sampling steps: a schedule (start/end percent, strength at each end, a curve)
that loaders and stacks take per adapter; applied in bypass mode, looked up once per model call.

Percent is the host's sampling percent (0 = first step, highest sigma; 1 = last). An APPLY_MODEL
wrapper turns the sigma of each model call into a percent with the model's own
`percent_to_sigma` (inverted by bisection, cached per sigma) and publishes it to the bypass
wrappers of that call; outside sampling no percent is known and scheduled adapters run at their
plain strength.
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

CATEGORY = "loaders/lycoris"  # as nodes.loaders; not imported from there: loaders imports us
SCHEDULE_TYPE = "LYCORIS_SCHEDULE"
WRAPPER_KEY = "lycoris_schedule"
BISECTION_STEPS = 30  # 2**-30 ~ 1e-9: far below any step spacing

# name -> shape on [0, 1] -> [0, 1] (0 at start_percent, 1 at end_percent)
CURVES = {
    "linear": lambda t: t,
    "cosine": lambda t: (1.0 - math.cos(math.pi * t)) / 2.0,
    "constant": lambda t: 0.0,
}

_percent: contextvars.ContextVar[float | None] = contextvars.ContextVar("lycoris_step_percent",
                                                                          default=None)


@dataclass(frozen=True)
class StrengthSchedule:
    """Multiplier of an adapter's model strength as a function of the sampling percent: 0 outside
    [start_percent, end_percent], inside going from start_strength to end_strength along `curve`
    (`constant` holds start_strength)."""

    start_percent: float = 0.0
    end_percent: float = 1.0
    start_strength: float = 1.0
    end_strength: float = 1.0
    curve: str = "linear"

    def __post_init__(self):
        if self.curve not in CURVES:
            raise ValueError(f"curve must be one of {', '.join(CURVES)}, not {self.curve!r}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got "
                             f"{self.start_percent} and {self.end_percent}")

    def factor(self, percent: float) -> float:
        if percent < self.start_percent or percent > self.end_percent:
            return 0.0
        span = self.end_percent - self.start_percent
        t = 0.0 if span == 0 else (percent - self.start_percent) / span
        return self.start_strength + (self.end_strength - self.start_strength) * CURVES[self.curve](t)

    def describe(self) -> str:
        """`x1 -> x0.25 (linear) from 20% to 80% of the steps, off outside`."""
        shape = (f"x{self.start_strength:g}" if self.curve == "constant" else
                 f"x{self.start_strength:g} -> x{self.end_strength:g}")
        return (f"{shape} ({self.curve}) from {self.start_percent:.0%} to {self.end_percent:.0%} "
                "of the steps, off outside")


def current_percent() -> float | None:
    """The sampling percent of the model call in progress, None outside sampling."""
    return _percent.get()


def percent_of_sigma(model_sampling, sigma: float) -> float:
    """The percent whose `percent_to_sigma` is `sigma` (it decreases with percent)."""
    def at(p: float) -> float:
        return float(model_sampling.percent_to_sigma(p))

    if sigma >= at(0.0):
        return 0.0
    if sigma <= at(1.0):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if at(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class _StepWrapper:
    """APPLY_MODEL wrapper: publishes the call's percent to the bypass wrappers while it runs."""

    def __init__(self):
        self._cache: dict[tuple[int, float], float] = {}

    def __call__(self, executor, x, t, *args, **kwargs):
        model_sampling = getattr(executor.class_obj, "model_sampling", None)
        percent = None
        if model_sampling is not None and t.numel() > 0:
            sigma = float(t.reshape(-1)[0])  # a batch shares its step
            key = (id(model_sampling), sigma)
            if key not in self._cache:
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[key] = percent_of_sigma(model_sampling, sigma)
            percent = self._cache[key]
        token = _percent.set(percent)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            _percent.reset(token)


_STEP_WRAPPER = _StepWrapper()


def add_step_wrapper(patcher) -> None:
    """Make the sampling percent known to scheduled bypass adapters of `patcher` (once)."""
    from comfy.patcher_extension import WrappersMP

    if not patcher.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, _STEP_WRAPPER)


class LycorisStrengthSchedule:
    """The schedule as a node value for Load LyCORIS / LyCORIS Stack."""

    CATEGORY = CATEGORY
    FUNCTION = "schedule"
    RETURN_TYPES = (SCHEDULE_TYPE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("Wire into the schedule input of Load LyCORIS or a LyCORIS Stack slot.",)
    DESCRIPTION = ("Strength over the sampling steps for one adapter: off before start_percent and "
                   "after end_percent, in between going from start_strength to end_strength along "
                   "the curve, as a multiplier of the loader's model strength. The adapter runs in "
                   "bypass while scheduled (text-encoder strength is not scheduled).")

    @classmethod
    def INPUT_TYPES(cls):
        percent = {"min": 0.0, "max": 1.0, "step": 0.01}
        strength = {"min": -10.0, "max": 10.0, "step": 0.01}
        return {"required": {
            "start_percent": ("FLOAT", {**percent, "default": 0.0, "tooltip":
                                        "Where the adapter starts (0 = first step)."}),
            "end_percent": ("FLOAT", {**percent, "default": 1.0, "tooltip":
                                      "Where it stops (1 = last step); off afterwards."}),
            "start_strength": ("FLOAT", {**strength, "default": 1.0, "tooltip":
                                         "Multiplier of the model strength at start_percent."}),
            "end_strength": ("FLOAT", {**strength, "default": 1.0, "tooltip":
                                       "Multiplier at end_percent."}),
            "curve": (list(CURVES), {"default": "linear", "tooltip": "linear or cosine (ease in "
                                     "and out) from start to end strength; constant holds "
                                     "start_strength."}),
        }}

    def schedule(self, start_percent, end_percent, start_strength, end_strength, curve):
        if start_percent > end_percent:
            raise ValueError(f"LyCORIS schedule: start_percent {start_percent} is after "
                             f"end_percent {end_percent}")
        return (StrengthSchedule(start_percent, end_percent, start_strength, end_strength, curve),)


NODE_CLASS_MAPPINGS = {"LycorisStrengthSchedule": LycorisStrengthSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"LycorisStrengthSchedule": "LyCORIS Strength Schedule"}
