"""The one train step (any objective) and the eval step: `jax.jit` over split NNX state, merged inside.

An *objective* is a pytree with a method ``objective(model, batch [B, T+1], key, step) ->
(summed loss, token count, metrics)``, where ``metrics`` maps each name in ``objective.metric_names``
to ``(numerator, denominator)`` sums that the step adds up over micro-batches and divides once
(e.g. ``mix_rate`` is fed inputs over replaceable inputs). Teacher forcing (``TeacherForcing``, here)
and scheduled sampling (``arjax.train.exposure.scheduled_sampling.ScheduledSampling``) are two objectives.

Everything the step needs beyond the graph and the optimizer is a traced argument: the step
number, the run's key (so runs over seeds share one program) and the objective's own numbers
(a schedule). The jitted functions live at module level with the graph and the optimizer as
static arguments, so two runs of one architecture and optimizer compile once between them.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from arjax.model.rng import seed_key
from arjax.train.loss import hidden_loss

# How many times each jitted function was traced (compiled): tests and benchmarks count them.
TRACE_COUNTS: collections.Counter = collections.Counter()


def step_key(key: jax.Array, step) -> jax.Array:
    """The key of optimizer step ``step``: a function of (run key, step) only, so a resumed run is exact."""
    return jax.random.fold_in(key, step)


def teacher_forced_nll(model, batch: jax.Array, pad_id: int | None, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """Summed NLL and token count for one batch [B, T+1], in one parallel (teacher-forced) pass."""
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T], [B, T]
    h, _ = model.hidden(inputs, dropout_rng=dropout_rng)  # [B, T, D]; the head runs inside the loss, in chunks
    mask = None if pad_id is None else targets != pad_id
    mean, n = hidden_loss(model, h, targets, mask)
    return mean * n, n  # the sum (not the mean): micro-batches combine weighted by their token counts


@struct.dataclass(kw_only=True)
class TeacherForcing:
    """The teacher-forcing objective: next-token cross-entropy on gold inputs; no metrics of its own."""

    pad_id: int | None = struct.field(pytree_node=False, default=None)
    dropout: bool = struct.field(pytree_node=False, default=False)
    metric_names = ()

    def __call__(self, model, batch, key, step):
        loss_sum, n = teacher_forced_nll(model, batch, self.pad_id, key if self.dropout else None)
        return loss_sum, n, {}


def _train_step_impl(graphdef, tx, params, opt_state, batches, step, key, objective, grad_shardings=None):
    TRACE_COUNTS["train_step"] += 1
    key = step_key(key, step)

    def micro(carry, xs):
        grads_acc, sums = carry
        batch, i = xs

        def loss_fn(params):
            loss_sum, n, metrics = objective(nnx.merge(graphdef, params), batch, jax.random.fold_in(key, i), step)
            return loss_sum, (n, metrics)

        (loss_sum, (n, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new = {"loss": (loss_sum, n), **metrics}
        sums = jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), sums, new)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        if grad_shardings is not None:  # the accumulated gradient stays sharded like the parameters
            grads_acc = jax.lax.with_sharding_constraint(grads_acc, grad_shardings)
        return (grads_acc, sums), None

    zero = jnp.zeros((), jnp.float32)
    sums0 = {name: (zero, zero) for name in ("loss", *objective.metric_names)}
    A = batches.shape[0]
    grads0 = jax.tree.map(jnp.zeros_like, params)
    if grad_shardings is not None:
        grads0 = jax.lax.with_sharding_constraint(grads0, grad_shardings)
    (grads, sums), _ = jax.lax.scan(micro, (grads0, sums0), (batches, jnp.arange(A)))
    n = jnp.maximum(sums["loss"][1], 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {name: jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0) for name, (num, den) in sums.items()}
    metrics.update(grad_norm=optax.tree.norm(grads), tokens=sums["loss"][1])
    return params, opt_state, metrics


# One device, shardings left to JAX (the library API without a plan).
_train_step = jax.jit(_train_step_impl, static_argnums=(0, 1), donate_argnums=(2, 3))

# (graphdef, tx, plan) -> the step jitted with that plan's shardings in and out: built once per
# architecture, optimizer and mesh, so a study over seeds (or a resumed run) compiles it once.
_SHARDED_STEPS: dict = {}


def sharded_train_step(graphdef, tx, plan, param_shardings, opt_shardings):
    """The jitted step for ``plan`` (an ``arjax.model.sharding.Plan``): params and optimizer state in
    and out with their shardings (donated), batches [A, B, T+1] split over B, everything else replicated."""
    cache_key = (graphdef, tx, plan)
    if cache_key not in _SHARDED_STEPS:
        rep = plan.replicated
        fn = functools.partial(_train_step_impl, graphdef, tx, grad_shardings=param_shardings)
        _SHARDED_STEPS[cache_key] = jax.jit(
            fn,
            in_shardings=(param_shardings, opt_shardings, plan.batch_sharding(3, 1), rep, rep, rep),
            out_shardings=(param_shardings, opt_shardings, rep),
            donate_argnums=(0, 1),
        )
    return _SHARDED_STEPS[cache_key]


_COMPILED: dict = {}


def compiled_train_step(step_fn, plan, params, opt_state, batches, objective):
    """``step_fn`` (from ``sharded_train_step`` with ``plan``) compiled ahead for these shapes, cached: the caller
    reads the per-device memory (``.memory_analysis()``) before step 0, and every later fit of the
    same shapes reuses the executable instead of compiling it again."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        (params, opt_state, batches),
    )
    cache_key = (step_fn, jax.tree.structure(abstract), tuple(jax.tree.leaves(abstract)), jax.tree.structure(objective))
    if cache_key not in _COMPILED:
        step0 = jnp.zeros((), jnp.int32)
        with jax.set_mesh(plan.mesh):  # the model constrains its activations to this mesh's batch axes
            _COMPILED[cache_key] = step_fn.lower(*abstract, step0, seed_key(0), objective).compile()
    return _COMPILED[cache_key]


def make_train_step(graphdef, tx: optax.GradientTransformation, objective=None):
    """``train_step(params, opt_state, batches [A, B, T+1], step, key, objective=None)
    -> (params, opt_state, metrics)``.

    One jitted call per optimizer update: the A micro-batches are scanned, the objective's
    summed losses and gradients added up and divided by the total token count, so A
    micro-batches of B equal one batch of A*B. Params and optimizer state are donated: their
    buffers are reused for the new values. ``key`` is the run's key (or an int seed); the step's
    key is ``fold_in(key, step)`` and micro-batch i's ``fold_in(step key, i)``. ``objective``
    (default: the one given here, else ``TeacherForcing()``) may be replaced per call by another
    of the same structure, e.g. new schedule numbers, without recompiling. ``metrics`` holds
    ``loss``, ``grad_norm``, ``tokens`` and the objective's own.
    """
    default = TeacherForcing() if objective is None else objective

    def train_step(params, opt_state, batches, step, key, objective=None):
        if getattr(batches, "ndim", None) != 3:
            raise ValueError(
                f"batches has shape {getattr(batches, 'shape', None)}; pass [A micro-batches, B, T+1] "
                "(add a leading axis of 1 for one batch)"
            )
        return _train_step(
            graphdef,
            tx,
            params,
            opt_state,
            jnp.asarray(batches, jnp.int32),
            jnp.asarray(step, jnp.int32),
            seed_key(key),
            default if objective is None else objective,
        )

    return train_step


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_step(graphdef, pad_id, params, windows):
    TRACE_COUNTS["eval_step"] += 1
    model = nnx.merge(graphdef, params)

    def one(carry, batch):
        loss_sum, n = teacher_forced_nll(model, batch, pad_id)
        return (carry[0] + loss_sum, carry[1] + n), None

    (loss_sum, n), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), windows)
    return loss_sum / jnp.maximum(n, 1.0)


def make_eval_step(graphdef, *, pad_id: int | None = None):
    """``eval_step(params, windows [N, B, T+1]) -> mean NLL`` over every target token of the N
    batches (teacher forced)."""
    return functools.partial(_eval_step, graphdef, pad_id)
