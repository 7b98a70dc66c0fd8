"""The optimizer: optax AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import functools

import jax
import optax

from arjax.model.params import role


def decay_mask(params, *, decay_embeddings: bool = False):
    """A pytree of bools shaped like ``params``: True where weight decay applies.

    Each parameter's row of the one table of parameter roles (``arjax.model.params.ROLES``) decides:
    kernels decay; norm scales and biases and every bias do not; the token and position embeddings
    only with ``decay_embeddings``. With tied embeddings the embedding is also the output head;
    nanoGPT decays it, so ``decay_embeddings=True`` reproduces nanoGPT.
    """

    def decays(path, _leaf) -> bool:
        flag = role(path).decays
        return decay_embeddings if flag is None else flag

    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(*, lr: float, warmup_steps: int, decay_steps: int, min_lr: float) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``decay_steps``."""
    if warmup_steps >= decay_steps:
        # Warmup only (e.g. very short test runs): optax's cosine needs decay_steps > warmup_steps.
        return optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=decay_steps, end_value=min_lr
    )


@functools.lru_cache(maxsize=64)
def make_optimizer(
    *,
    lr: float,
    warmup_steps: int,
    decay_steps: int,
    min_lr: float,
    weight_decay: float,
    beta1: float = 0.9,
    beta2: float = 0.95,
    grad_clip: float | None = 1.0,
    decay_embeddings: bool = False,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (fp32 moments on fp32 master weights) behind global-norm clipping; returns (tx, schedule).

    The weight-decay mask is a function of the parameters' names (``decay_mask``), so the
    transformation does not depend on any particular parameters. Equal settings return the same
    transformation object: a jitted train step keyed on it is shared, so a study training many
    seeds with one optimizer compiles its step once.
    """
    schedule = lr_schedule(lr=lr, warmup_steps=warmup_steps, decay_steps=decay_steps, min_lr=min_lr)
    mask = functools.partial(decay_mask, decay_embeddings=decay_embeddings)
    adamw = optax.adamw(schedule, b1=beta1, b2=beta2, weight_decay=weight_decay, mask=mask)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    return optax.chain(*parts, adamw), schedule


def optimizer_from_config(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer a TrainConfig describes."""
    return make_optimizer(
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.lr_decay_steps or cfg.steps,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        grad_clip=cfg.grad_clip,
        decay_embeddings=cfg.decay_embeddings,
    )
