"""Gold-probability schedules: the closed forms, validation, composition, and no recompiles under jit."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.train.exposure.schedules import GoldSchedule, Schedule, as_gold_schedule, constant, make_schedule


@pytest.mark.parametrize(
    "kind, params, formula",
    [
        ("constant", dict(k=0.3), lambda i: 0.3),
        ("linear", dict(k=1.0, c=0.01, eps_min=0.2), lambda i: max(0.2, 1.0 - 0.01 * i)),
        ("exponential", dict(k=0.99), lambda i: 0.99**i),
        ("inverse_sigmoid", dict(k=50.0), lambda i: 50.0 / (50.0 + math.exp(i / 50.0))),
    ],
)
def test_step_schedules_match_the_closed_forms(kind, params, formula):
    sched = make_schedule(kind, **params)
    steps = np.array([0, 1, 10, 50, 79, 200, 1000])
    got = np.asarray(sched(steps))
    want = np.array([formula(float(i)) for i in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_inverse_sigmoid_does_not_overflow_to_nan():
    assert float(make_schedule("inverse_sigmoid", k=1.0)(1e6)) == 0.0


@pytest.mark.parametrize(
    "kind, params, match",
    [
        ("cosine", {}, "unknown schedule kind"),
        ("linear", dict(k=1.0, cc=0.1), r"not \['cc'\]"),
        ("constant", dict(k=1.5), "must be a probability"),
        ("exponential", dict(k=1.2), "must be in \\(0, 1\\]"),
        ("inverse_sigmoid", dict(k=0.5), "must be >= 1"),
        ("linear", dict(c=-1.0), "must be >= 0"),
        ("linear", dict(eps_min=2.0), "eps_min=2.0"),
        ("constant", dict(k=float("nan")), "finite number"),
    ],
)
def test_bad_schedules_are_refused_with_the_value_named(kind, params, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(kind, **params)


def test_position_schedule_composes_with_step_schedule():
    step = make_schedule("linear", k=1.0, c=0.1)
    pos = make_schedule("exponential", k=0.5)
    T = 5
    prod = np.asarray(GoldSchedule(step=step, position=pos)(3, T))
    want = 0.7 * 0.5 ** np.arange(T)
    want[0] = 1.0  # position 0 is never predicted, so always gold
    np.testing.assert_allclose(prod, want, rtol=1e-6)
    mn = np.asarray(GoldSchedule(step=step, position=pos, combine="min")(3, T))
    want = np.minimum(0.7, 0.5 ** np.arange(T))
    want[0] = 1.0
    np.testing.assert_allclose(mn, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(as_gold_schedule(0.25)(0, 3)), [1.0, 0.25, 0.25])
    with pytest.raises(ValueError, match="combine='sum'"):
        GoldSchedule(step=step, combine="sum")


def test_changing_step_or_numbers_never_recompiles():
    traces = []

    @jax.jit
    def f(step, sched):
        traces.append(1)
        return sched(step, 8)

    base = GoldSchedule(step=make_schedule("linear", k=1.0, c=0.01), position=make_schedule("exponential", k=0.9))
    outs = [f(jnp.int32(i), base) for i in range(3)]
    other = GoldSchedule(
        step=make_schedule("linear", k=0.8, c=0.02, eps_min=0.1), position=make_schedule("exponential", k=0.5)
    )
    outs.append(f(jnp.int32(5), other))
    assert len(traces) == 1
    # and the traced values are the right ones
    np.testing.assert_allclose(np.asarray(outs[-1]), np.asarray(other(5, 8)), rtol=1e-6)
    assert float(outs[1][1]) == pytest.approx(0.99 * 0.9, rel=1e-6)


def test_schedule_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        Schedule("constant", 0.5)  # type: ignore[misc]
    s = constant(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.k = 0.1  # type: ignore[misc]
