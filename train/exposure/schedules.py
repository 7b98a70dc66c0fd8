"""Gold-token probability schedules for scheduled sampling: over the training step, over the
decoding position, and composed.

A schedule answers "with what probability is the gold token fed at this input?". Bengio et al.
(2015) decay it with the training step ``i``; Liu et al. (2021, "Scheduled sampling based on
decoding steps") decay it with the decoding position ``t`` as well, and compose the two.

Schedules are pytrees whose numbers (``k``, ``c``, ``eps_min``) are leaves and whose family
(``kind``) is static, so a jitted train step that takes the schedule (inside its scheduled-sampling
objective) as an argument evaluates it on traced scalars: a new step, or new numbers, never
recompile. In a run config they are mappings: ``schedule: {step: {kind: linear, k: 1.0, c: 1e-4}}``.

    sched = make_schedule("inverse_sigmoid", k=500.0)              # Bengio et al.: k / (k + exp(i / k))
    gold = GoldSchedule(step=sched,
                        position=make_schedule("exponential", k=0.99))  # Liu et al.: decays with t
    p = gold(step, seq_len)                                        # [T] gold probability per input position

Families (``x`` is the step or the position; every value is floored at ``eps_min`` and clipped to [0, 1]):
  constant          k
  linear            max(eps_min, k - c * x)
  exponential       k ** x                     (0 < k <= 1)
  inverse_sigmoid   k / (k + exp(x / k))       (k >= 1)
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

KINDS = ("constant", "linear", "exponential", "inverse_sigmoid")
COMBINES = ("product", "min")


_PARAMS = {
    "constant": ("k",),
    "linear": ("k", "c", "eps_min"),
    "exponential": ("k", "eps_min"),
    "inverse_sigmoid": ("k", "eps_min"),
}
_DEFAULTS = {"k": 1.0, "c": 0.0, "eps_min": 0.0}


def _concrete(*values) -> bool:
    """True when every value is a plain number (numpy scalars included): validation runs where users
    build a schedule, not when JAX rebuilds one from traced leaves inside jit."""
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)


@struct.dataclass(kw_only=True)
class Schedule:
    """One decay family evaluated at a step or position ``x``: ``schedule(x) -> gold probability``.

    Frozen and keyword-only; the numbers are traced leaves, ``kind`` is static. Strict: a number
    the family does not use must stay at its default (a typo must not silently become the default).
    """

    kind: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = struct.field(pytree_node=False)
    k: float = 1.0
    c: float = 0.0
    eps_min: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind={self.kind!r}; choose one of {KINDS}")
        values = {"k": self.k, "c": self.c, "eps_min": self.eps_min}
        for name, v in values.items():
            if isinstance(v, (str, bool, list, dict)):
                raise TypeError(f"schedule {name}={v!r} ({type(v).__name__}) should be a number")
        if not _concrete(*values.values()):
            return  # traced leaves inside jit: validated when the user built it
        for name, v in values.items():  # 1 and 1.0 must be the same (float32) leaf to jit
            object.__setattr__(self, name, float(v))
        for name, v in values.items():
            if not math.isfinite(v):
                raise ValueError(f"schedule parameter {name}={v!r} must be a finite number")
        unused = [n for n in values if n not in _PARAMS[self.kind] and values[n] != _DEFAULTS[n]]
        if unused:
            raise ValueError(f"schedule {self.kind!r} takes {list(_PARAMS[self.kind])}, not {unused}")
        if not 0.0 <= self.eps_min <= 1.0:
            raise ValueError(f"eps_min={self.eps_min} must be in [0, 1] (it is a probability floor)")
        if self.kind == "constant" and not 0.0 <= self.k <= 1.0:
            raise ValueError(f"constant schedule k={self.k} must be a probability in [0, 1]")
        if self.kind == "linear" and self.c < 0:
            raise ValueError(f"linear schedule c={self.c} must be >= 0 (the gold probability decays)")
        if self.kind == "exponential" and not 0.0 < self.k <= 1.0:
            raise ValueError(f"exponential schedule k={self.k} must be in (0, 1]; k ** i decays only then")
        if self.kind == "inverse_sigmoid" and self.k < 1.0:
            raise ValueError(f"inverse_sigmoid schedule k={self.k} must be >= 1 (Bengio et al.); try k=100")

    def __call__(self, x) -> jax.Array:
        """Gold probability at step/position ``x`` (scalar or array, may be traced), float32, same shape."""
        x = jnp.asarray(x, jnp.float32)
        k, c, eps = (jnp.asarray(v, jnp.float32) for v in (self.k, self.c, self.eps_min))
        if self.kind == "constant":
            p = jnp.broadcast_to(k, x.shape)
        elif self.kind == "linear":
            p = k - c * x
        elif self.kind == "exponential":
            p = k**x
        else:
            # exp(x / k) overflows float32 for large x; k / (k + inf) = 0 is the right limit anyway.
            p = k / (k + jnp.exp(x / k))
        return jnp.clip(jnp.maximum(p, eps), 0.0, 1.0)

    def describe(self) -> str:
        """One line for logs, e.g. ``linear(k=1, c=0.0001, eps_min=0.75)``."""
        return f"{self.kind}(" + ", ".join(f"{n}={getattr(self, n):g}" for n in _PARAMS[self.kind]) + ")"


def make_schedule(kind: str, **params: float) -> Schedule:
    """A validated schedule, e.g. ``make_schedule("linear", k=1.0, c=1e-4, eps_min=0.1)``.

    Strict: a parameter the family does not use is an error (a typo must not silently become the default).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {KINDS}")
    unknown = sorted(set(params) - set(_PARAMS[kind]))
    if unknown:
        raise ValueError(f"schedule {kind!r} takes {list(_PARAMS[kind])}, not {unknown}")
    return Schedule(kind=kind, **params)


def constant(p: float) -> Schedule:
    """The same gold probability at every step/position (p=1 is teacher forcing)."""
    return make_schedule("constant", k=p)


@struct.dataclass(kw_only=True)
class GoldSchedule:
    """The gold probability for input position t at training step i: ``step(i)`` composed with ``position(t)``.

    ``combine="product"`` multiplies the two (Liu et al. 2021 compose the step- and position-based
    decays this way); ``"min"`` takes the smaller. ``position=None`` means no position dependence.
    """

    step: Schedule
    position: Schedule | None = None
    combine: Literal["product", "min"] = struct.field(pytree_node=False, default="product")

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"GoldSchedule combine={self.combine!r}; choose one of {COMBINES}")
        if not isinstance(self.step, Schedule):
            raise TypeError(
                f"GoldSchedule step={self.step!r} should be a schedule, e.g. {{kind: linear, k: 1.0, c: 1.0e-4}}"
            )
        if self.position is not None and not isinstance(self.position, Schedule):
            raise TypeError(
                f"GoldSchedule position={self.position!r} should be a schedule or null, "
                "e.g. {kind: exponential, k: 0.99}"
            )

    def __call__(self, step, seq_len: int) -> jax.Array:
        """[T] float32 gold probability for input positions 0..T-1 at training step ``step`` (may be traced).

        Position 0 is reported as 1: nothing predicts the first input, so it is always gold.
        """
        p_step = self.step(step)  # []
        t = jnp.arange(seq_len, dtype=jnp.float32)  # [T]
        if self.position is None:
            p = jnp.broadcast_to(p_step, (seq_len,))
        elif self.combine == "product":
            p = p_step * self.position(t)
        else:
            p = jnp.minimum(p_step, self.position(t))
        return p.at[0].set(1.0)


def as_gold_schedule(schedule: Schedule | GoldSchedule | float) -> GoldSchedule:
    """Accept a bare step schedule or a constant probability where a GoldSchedule is wanted."""
    if isinstance(schedule, GoldSchedule):
        return schedule
    if isinstance(schedule, Schedule):
        return GoldSchedule(step=schedule)
    if _concrete(schedule):
        return GoldSchedule(step=constant(float(schedule)))
    raise ValueError(f"schedule={schedule!r}: pass a Schedule, a GoldSchedule or a probability in [0, 1]")
