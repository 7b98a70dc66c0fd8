"""The teacher-forced train step and the eval step: `jax.jit` over split NNX state, merged inside."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arjax.train.loss import next_token_loss


def step_key(seed: int, step) -> jax.Array:
    """The dropout key for optimizer step ``step``: a function of (seed, step) only, so a resumed run is exact."""
    return jax.random.fold_in(jax.random.key(seed), step)


def _loss_sum(params, graphdef, batch, dropout_rng, pad_id):
    """Summed NLL and token count for one micro-batch [B, T+1], in one parallel (teacher-forced) pass."""
    model = nnx.merge(graphdef, params)
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T], [B, T]
    logits, _ = model(inputs, dropout_rng=dropout_rng)  # [B, T, V] float32
    mask = None if pad_id is None else targets != pad_id
    mean, n = next_token_loss(logits, targets, mask)
    # The sum (not the mean) so micro-batches combine weighted by their token counts.
    return mean * n, n


def make_train_step(graphdef, tx: optax.GradientTransformation, *, seed: int, use_dropout: bool, pad_id: int | None = None):
    """``train_step(params, opt_state, batches [A, B, T+1], step) -> (params, opt_state, metrics)``.

    One jitted call per optimizer update: the A micro-batches are scanned, their gradients summed
    and divided by the total token count, so A micro-batches of B equal one batch of A*B.
    Params and optimizer state are donated: their buffers are reused for the new values.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batches, step):
        key = step_key(seed, step)

        def micro(carry, xs):
            grads_acc, loss_acc, n_acc = carry
            batch, i = xs
            rng = jax.random.fold_in(key, i) if use_dropout else None
            (loss_sum, n), grads = jax.value_and_grad(_loss_sum, has_aux=True)(params, graphdef, batch, rng, pad_id)
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss_sum, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        A = batches.shape[0]
        (grads, loss_sum, n), _ = jax.lax.scan(
            micro, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), (batches, jnp.arange(A))
        )
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss_sum / n, "grad_norm": optax.tree.norm(grads), "tokens": n}
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef, *, pad_id: int | None = None):
    """``eval_step(params, windows [N, B, T+1]) -> mean NLL`` over every target token of the N batches."""

    @jax.jit
    def eval_step(params, windows):
        def one(carry, batch):
            loss_sum, n = _loss_sum(params, graphdef, batch, None, pad_id)
            return (carry[0] + loss_sum, carry[1] + n), None

        (loss_sum, n), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), windows)
        return loss_sum / jnp.maximum(n, 1.0)

    return eval_step
