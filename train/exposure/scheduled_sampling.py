"""Scheduled sampling for transformers: two-pass, K-pass parallel and exact sequential objectives,
as an objective of the one train step.

Scheduled sampling (Bengio et al. 2015) trains on inputs in which some gold tokens are replaced
by the model's own predictions, so training sees the kind of prefixes generation produces.

Alignment (the part reference implementations get wrong): a batch ``tokens [B, T+1]`` gives
inputs ``x_0..x_{T-1}`` and targets ``x_1..x_T``. The logits at position ``t-1`` predict ``x_t``, so
the model's stand-in for input ``x_t`` (t >= 1) comes from position ``t-1`` of the previous pass.
Input 0 is always gold: nothing predicts it.

Methods (``ScheduledSamplingConfig.method``):
  parallel, num_passes=2   Mihaylova & Martins (2019): pass 1 teacher-forced; pass 2 sees, at each
                           position, gold ``x_t`` or pass 1's prediction from ``t-1``.
  parallel, num_passes=K   Duckworth et al. (2019): pass k mixes gold with pass k-1's predictions
                           (the same coins every pass); the loss is on the last pass. K=2 is two-pass.
  sequential               Exact: one token at a time through ``lax.scan`` with the KV cache, each
                           model-fed input drawn from the logits the model just produced for it
                           (token feeds run the decoder's own ``arjax.decode.decode_step``). Short
                           sequences: it costs about T small steps (docs/benchmarks.md).

What is fed back (``feed``): ``argmax`` token, ``sample`` (a token drawn at ``temperature``),
``soft`` (softmax-weighted mixture of all token embeddings), ``soft_topk`` (mixture over the top-k),
``gumbel`` (Gumbel-softmax mixture at temperature ``temperature``; ``gumbel_hard`` for straight-through).
Coins (``granularity``): per ``token``, per ``sequence`` (one draw per row), or ``prefix`` (as many gold
inputs as the token coins give, but all at the start, then model inputs to the end of the row).

Public API:
  ScheduledSamplingConfig              frozen, keyword-only, strict; the ``scheduled_sampling:`` section
                                       of a run config (``arjax.train.config.TrainConfig``)
  ScheduledSampling(cfg=..., pad_id=None, dropout=False)
                                       the objective for ``arjax.train.step.make_train_step``
  draw_coins(key, gold_prob, B, T, granularity) -> use_model [B, T] bool
  ss_loss(model, tokens, key, gold_prob, cfg, *, mask=None, dropout_rng=None) -> (loss, aux)

``aux`` (and the train step's metrics) carry, every step: ``gold_prob`` (the scheduled probability, mean over
replaceable inputs), ``mix_rate`` (the realised fraction of replaceable inputs fed by the model),
``differ_rate`` (the fraction whose fed-back token differs from gold; for mixtures, the argmax of
the mixture), and ``pass1_loss`` / ``pass2_loss``. A run whose ``differ_rate`` stays at 0 is
teacher forcing in disguise.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from arjax.decode import SamplingParams, decode_step, init_state, prefill, sample
from arjax.model.cache import init_cache
from arjax.model.config import NON_NEGATIVE, bounds, check_field_types, strict_from_dict
from arjax.train.exposure.schedules import GoldSchedule, as_gold_schedule, constant
from arjax.train.loss import hidden_loss, next_token_loss

__all__ = ["ScheduledSamplingConfig", "ScheduledSampling", "draw_coins", "ss_loss", "from_dict"]

_SOFT_FEEDS = ("soft", "soft_topk", "gumbel")


@struct.dataclass(kw_only=True)
class ScheduledSamplingConfig:
    """Everything about the scheduled-sampling objective. A pytree: the schedule's numbers are traced
    leaves, every other field is static (part of the compiled program)."""

    method: Literal["parallel", "sequential"] = struct.field(pytree_node=False, default="parallel")
    # parallel only: 2 = two-pass (Mihaylova & Martins), K > 2 = Duckworth et al.
    num_passes: int = struct.field(
        pytree_node=False, default=2, metadata=bounds(2, fix="parallel scheduled sampling needs at least 2 passes")
    )
    feed: Literal["argmax", "sample", "soft", "soft_topk", "gumbel"] = struct.field(pytree_node=False, default="sample")
    # sampling temperature (sample, soft, soft_topk) or Gumbel-softmax tau (gumbel)
    temperature: float = struct.field(
        pytree_node=False, default=1.0, metadata=bounds(0, lo_open=True, fix="use feed 'argmax' for greedy feedback")
    )
    top_k: int = struct.field(
        pytree_node=False, default=0, metadata=NON_NEGATIVE
    )  # soft_topk only: the mixture is over the k most likely tokens
    # gumbel only: feed the one-hot argmax, gradient of the soft sample (straight-through)
    gumbel_hard: bool = struct.field(pytree_node=False, default=False)
    granularity: Literal["token", "sequence", "prefix"] = struct.field(pytree_node=False, default="token")
    # Gradient into the earlier pass through what is fed back (mixtures only: a drawn token has none).
    grad_through_pass1: bool = struct.field(pytree_node=False, default=False)
    pass1_weight: float = struct.field(
        pytree_node=False, default=0.0, metadata=NON_NEGATIVE
    )  # weight of the teacher-forced (pass 1) loss
    pass2_weight: float = struct.field(
        pytree_node=False, default=1.0, metadata=NON_NEGATIVE
    )  # weight of the scheduled (last pass / sequential) loss
    # The gold probability over training steps (and optionally positions); a bare Schedule is its step part.
    schedule: GoldSchedule = struct.field(default_factory=lambda: GoldSchedule(step=constant(1.0)))

    def __post_init__(self):
        if not isinstance(self.schedule, GoldSchedule):
            object.__setattr__(self, "schedule", as_gold_schedule(self.schedule))
        check_field_types(self)
        if self.method == "sequential" and self.num_passes != 2:
            raise ValueError(
                f"num_passes={self.num_passes} applies to method='parallel' only; leave it at 2 for 'sequential'"
            )
        if self.feed == "soft_topk" and self.top_k < 1:
            raise ValueError(f"feed='soft_topk' needs top_k >= 1, got top_k={self.top_k}")
        if self.feed != "soft_topk" and self.top_k != 0:
            raise ValueError(f"top_k={self.top_k} is used only by feed='soft_topk' (feed={self.feed!r}); leave it at 0")
        if self.gumbel_hard and self.feed != "gumbel":
            raise ValueError(f"gumbel_hard=True needs feed='gumbel', got feed={self.feed!r}")
        if self.pass1_weight + self.pass2_weight == 0:
            raise ValueError(
                "loss weights pass1_weight and pass2_weight are both 0; give one of them a positive weight"
            )

    @property
    def soft(self) -> bool:
        return self.feed in _SOFT_FEEDS

    @property
    def always_gold(self) -> bool:
        """True when the schedule is a constant gold probability of 1: teacher forcing at twice the passes."""
        s = self.schedule
        return all(x is None or (x.kind == "constant" and x.k >= 1.0) for x in (s.step, s.position))

    def describe(self) -> str:
        """One line for logs: method, feed, coins and schedule."""
        method = "sequential" if self.method == "sequential" else f"{self.num_passes}-pass"
        sched = self.schedule
        where = f" x position {sched.position.describe()} ({sched.combine})" if sched.position is not None else ""
        return (
            f"scheduled sampling: {method}, feed {self.feed}, coins per {self.granularity}, "
            f"gold probability {sched.step.describe()}{where}"
        )


def from_dict(d: dict[str, Any]) -> ScheduledSamplingConfig:
    """Strict: an unknown key is an error, never silently ignored; ``schedule`` is a nested mapping."""
    return strict_from_dict(ScheduledSamplingConfig, d)


# ----------------------------------------------------------------------------- coins and feedback


def draw_coins(key: jax.Array, gold_prob: jax.Array, batch: int, seq_len: int, granularity: str) -> jax.Array:
    """[B, T] bool, True where input t is fed by the model. ``gold_prob``: [] or [T] (may be traced).

    token:    independent per (row, position): P(model at t) = 1 - gold_prob[t].
    sequence: one uniform per row compared with every position's gold_prob (with a constant
              schedule the whole row is model-fed or gold).
    prefix:   the token coins decide how many inputs are gold; they are put first (positions
              1..n), the rest of the row is model-fed, so the expected mixing rate matches ``token``.
    Position 0 is never model-fed.
    """
    g = jnp.broadcast_to(jnp.asarray(gold_prob, jnp.float32), (seq_len,))  # [T]
    t = jnp.arange(seq_len)  # [T]
    if granularity == "sequence":
        u = jax.random.uniform(key, (batch, 1))  # [B, 1]
        use_model = u < 1.0 - g  # [B, T]
    else:
        u = jax.random.uniform(key, (batch, seq_len))  # [B, T]
        use_model = u < 1.0 - g
        if granularity == "prefix":
            n_gold = jnp.sum(~use_model[:, 1:], axis=1, keepdims=True)  # [B, 1] gold inputs among 1..T-1
            use_model = t[None, :] > n_gold
    return use_model & (t[None, :] > 0)


def _feed(model, pred_logits: jax.Array, key: jax.Array, cfg: ScheduledSamplingConfig):
    """What the model feeds back, from the logits that predict each input.

    pred_logits: [..., V] float32. Returns (tokens [...] int32, embeddings [..., D] or None):
    hard feeds give tokens only; mixtures give embeddings and, for counting, their argmax token.
    """
    if cfg.feed == "argmax":
        return jnp.argmax(pred_logits, axis=-1).astype(jnp.int32), None
    if cfg.feed == "sample":
        return jax.random.categorical(key, pred_logits / cfg.temperature, axis=-1).astype(jnp.int32), None
    logits = pred_logits
    if cfg.feed == "soft_topk":
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if cfg.feed == "gumbel":
        logits = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
    probs = jax.nn.softmax(logits / cfg.temperature, axis=-1)  # [..., V]
    tokens = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    if cfg.gumbel_hard:
        hard = jax.nn.one_hot(tokens, probs.shape[-1], dtype=probs.dtype)
        probs = hard + probs - jax.lax.stop_gradient(probs)  # forward: one-hot; backward: soft
    squeeze = probs.ndim == 2
    emb = model.embed_soft(probs[:, None] if squeeze else probs)  # [B, T, D]
    return tokens, emb[:, 0] if squeeze else emb


def _shift_right(x: jax.Array) -> jax.Array:
    """[B, T, ...] -> [B, T, ...] with x[:, t-1] at t (position 0 gets a copy of x[:, 0]; it is always gold)."""
    return jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)


def _mix(model, gold_inputs, use_model, fed_tokens, fed_emb):
    """Pass inputs: gold where the coin says gold, the model's feedback elsewhere.

    Returns ``(tokens, None)`` for hard feeds or ``(None, embeddings [B, T, D])`` for mixtures.
    """
    if fed_emb is None:
        return jnp.where(use_model, fed_tokens, gold_inputs), None
    gold_emb = model.embed_tokens(gold_inputs)  # [B, T, D]
    return None, jnp.where(use_model[..., None], fed_emb.astype(gold_emb.dtype), gold_emb)


# ----------------------------------------------------------------------------- objectives


def _parallel(model, inputs, targets, use_model, key, cfg, dropout_rng):
    """Teacher-forced pass 1, then K-1 passes each fed from the previous one: the logits of pass 1
    and the hidden states of pass K (its head runs inside the loss, in chunks: ``hidden_loss``)."""
    drop = lambda i: None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    logits1, _ = model(inputs, dropout_rng=drop(1))  # [B, T, V]
    logits = logits1
    fed_tokens = inputs
    for k in range(2, cfg.num_passes + 1):
        prev = logits if cfg.grad_through_pass1 else jax.lax.stop_gradient(logits)
        # The prediction made at t-1 (for token t) replaces input t: shift right by one.
        fed_tokens, fed_emb = _feed(model, _shift_right(prev), jax.random.fold_in(key, k), cfg)
        tok, emb = _mix(model, inputs, use_model, fed_tokens, fed_emb)
        h, _ = model.hidden(tok, embeddings=emb, dropout_rng=drop(k))  # [B, T, D]
        if k < cfg.num_passes:  # an intermediate pass feeds the next one: its logits are needed whole
            logits = model.logits(h)
    return logits1, h, fed_tokens


def _sequential(model, inputs, targets, use_model, key, cfg, dropout_rng):
    """Exact scheduled sampling: one position per ``lax.scan`` step through the KV cache.

    Each model-fed input is drawn from the logits the model produced one step earlier on the
    already mixed prefix, exactly as at generation time. Gradient flows through the cache
    (later positions attend to earlier keys); through fed-back mixtures only with
    ``grad_through_pass1``. Token feeds run the decoder's own ``arjax.decode.decode_step`` (the
    draw is ``arjax.decode.sample``, then mixed with gold and passed as ``forced_tokens``);
    mixtures need an embedding input, which ``decode_step`` does not take, so they run a thin
    step that makes the same one-slot cached model call.
    """
    logits1 = None
    if cfg.pass1_weight > 0:
        logits1, _ = model(inputs, dropout_rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1))
    if cfg.soft:
        logits, fed = _sequential_soft(model, inputs, use_model, key, cfg, dropout_rng)
    else:
        if dropout_rng is not None:
            raise ValueError(
                "method='sequential' with token feeds runs decode_step, which has no dropout; use dropout=0"
            )
        logits, fed = _sequential_decode(model, inputs, use_model, key, cfg)
    return logits1, logits, fed


def _sequential_decode(model, inputs, use_model, key, cfg):
    """Token feeds through ``decode_step``: prefill x_0, then one forced token per step."""
    B, T = inputs.shape
    cache = init_cache(model.cfg, B, T)
    pos0 = jnp.zeros((B, 1), jnp.int32)
    logits0, cache = prefill(model, inputs[:, :1], pos0, cache)  # [B, V]: the prediction for x_1
    n = max(T - 1, 1)
    state = init_state(logits0, cache, inputs[:, :1], pos0, num_slots=n, rng=jax.random.fold_in(key, 0), max_steps=n)
    # The decoder's sampler: temperature 0 is its argmax.
    sampling = SamplingParams.make(B, temperature=0.0 if cfg.feed == "argmax" else cfg.temperature)

    def step(state, xs):
        t, gold, coin = xs  # [], [B], [B]
        prev = state.logits if cfg.grad_through_pass1 else jax.lax.stop_gradient(state.logits)
        draw = sample(jax.random.fold_in(key, t), prev, sampling)  # [B]: the model's own next token
        state = decode_step(model, state, sampling, forced_tokens=jnp.where(coin, draw, gold))
        return state, (state.logits, draw)

    xs = (jnp.arange(1, T), inputs[:, 1:].T, use_model[:, 1:].T)  # scan over positions 1..T-1
    _, (logits, fed) = jax.lax.scan(step, state, xs)  # [T-1, B, V], [T-1, B]
    logits = jnp.concatenate([logits0[:, None], jnp.swapaxes(logits, 0, 1)], axis=1)  # [B, T, V]
    fed = jnp.concatenate([inputs[:, :1], fed.T], axis=1)  # [B, T]
    return logits, fed


def _sequential_soft(model, inputs, use_model, key, cfg, dropout_rng):
    """Mixture feeds: the same cached one-slot model call as ``decode_step``, fed an embedding."""
    B, T = inputs.shape
    cache = init_cache(model.cfg, B, T)

    def step(carry, xs):
        cache, prev_logits = carry  # prev_logits [B, V]: the prediction for this position
        t, gold, coin = xs  # [], [B], [B]
        prev = prev_logits if cfg.grad_through_pass1 else jax.lax.stop_gradient(prev_logits)
        fed_tok, fed_emb = _feed(model, prev, jax.random.fold_in(key, t), cfg)  # [B], [B, D]
        coin = coin & (t > 0)
        positions = jnp.full((B, 1), t, jnp.int32)
        rng = None if dropout_rng is None else jax.random.fold_in(jax.random.fold_in(dropout_rng, 2), t)
        gold_emb = model.embed_tokens(gold[:, None])  # [B, 1, D]
        emb = jnp.where(coin[:, None, None], fed_emb[:, None].astype(gold_emb.dtype), gold_emb)
        logits, cache = model(None, positions, cache, embeddings=emb, dropout_rng=rng)  # [B, 1, V]
        return (cache, logits[:, 0]), (logits[:, 0], fed_tok)

    init = (cache, jnp.zeros((B, model.cfg.vocab_size), jnp.float32))
    xs = (jnp.arange(T), inputs.T, use_model.T)  # scan over positions
    _, (logits, fed) = jax.lax.scan(step, init, xs)
    return jnp.swapaxes(logits, 0, 1), fed.T  # [B, T, V], [B, T]


def ss_loss(
    model,
    tokens: jax.Array,
    key: jax.Array,
    gold_prob: jax.Array,
    cfg: ScheduledSamplingConfig,
    *,
    mask: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scheduled-sampling loss of one batch and its per-step diagnostics.

    tokens: [B, T+1] int; ``gold_prob``: [] or [T] probability that input t is gold (traced; see
    ``GoldSchedule``); ``mask``: [B, T] over targets (bool, or float weights). Returns
    ``(pass1_weight * L_teacher_forced + pass2_weight * L_scheduled, aux)``; ``aux`` holds the two
    losses (``pass1_loss`` is 0 for ``sequential`` unless ``pass1_weight > 0``: no teacher-forced
    pass is run then), ``n_tokens``, ``gold_prob``, ``mix_rate``, ``differ_rate``, ``n_fed``, ``n_differ``,
    ``n_replaceable`` and ``use_model`` / ``fed_tokens`` [B, T] (what was fed where, for tests
    and analysis).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T], [B, T]
    B, T = inputs.shape
    coin_key, feed_key = jax.random.split(key)
    gold_prob = jnp.broadcast_to(jnp.asarray(gold_prob, jnp.float32), (T,))  # [T]
    use_model = draw_coins(coin_key, gold_prob, B, T, cfg.granularity)  # [B, T]

    if cfg.method == "sequential":  # the scan produces each position's logits (they feed the next step)
        logits1, logits2, fed_tokens = _sequential(model, inputs, targets, use_model, feed_key, cfg, dropout_rng)
        loss2, n = next_token_loss(logits2, targets, mask)
    else:  # the last pass's head and cross-entropy in chunks, as teacher forcing's
        logits1, h2, fed_tokens = _parallel(model, inputs, targets, use_model, feed_key, cfg, dropout_rng)
        loss2, n = hidden_loss(model, h2, targets, mask)
    loss = cfg.pass2_weight * loss2
    loss1 = jnp.zeros((), jnp.float32)
    if logits1 is not None:
        loss1, _ = next_token_loss(logits1, targets, mask)
        if cfg.pass1_weight > 0:
            loss = loss + cfg.pass1_weight * loss1

    # Input t (t >= 1) is real when the target before it (t-1) is: padding never counts as fed.
    valid = jnp.ones((B, T), bool) if mask is None else mask > 0
    replaceable = jnp.concatenate([jnp.zeros((B, 1), bool), valid[:, :-1]], axis=1)  # [B, T]
    fed = use_model & replaceable
    differ = fed & (fed_tokens != inputs)
    n_rep = jnp.maximum(replaceable.sum(), 1)
    aux = {
        "pass1_loss": loss1,
        "pass2_loss": loss2,
        "n_tokens": n,
        "gold_prob": (gold_prob[None, :] * replaceable).sum() / n_rep,
        "mix_rate": fed.sum() / n_rep,
        "differ_rate": differ.sum() / n_rep,
        "n_fed": fed.sum(),
        "n_differ": differ.sum(),
        "n_replaceable": replaceable.sum(),
        "use_model": use_model,
        "fed_tokens": fed_tokens,
    }
    return loss, aux


# ----------------------------------------------------------------------------- the objective


@struct.dataclass(kw_only=True)
class ScheduledSampling:
    """Scheduled sampling as an objective of ``arjax.train.step.make_train_step``.

    A pytree like its config: the schedule's numbers are traced, so a new schedule of the same
    family (and every new step) reuses the compiled train step. ``pad_id`` targets carry no loss
    and their inputs are never counted as fed; ``dropout`` turns the model's dropout on.
    """

    cfg: ScheduledSamplingConfig
    pad_id: int | None = struct.field(pytree_node=False, default=None)
    dropout: bool = struct.field(pytree_node=False, default=False)
    metric_names = ("pass1_loss", "pass2_loss", "gold_prob", "mix_rate", "differ_rate")

    def __post_init__(self):
        if self.dropout and self.cfg.method == "sequential" and not self.cfg.soft:
            raise ValueError(
                f"method='sequential' with feed={self.cfg.feed!r} runs the decoder's decode_step, which has no "
                "dropout; train with dropout=0 or use method='parallel'"
            )

    def __call__(self, model, batch: jax.Array, key: jax.Array, step: jax.Array):
        """``(summed loss, token count, metrics as (numerator, denominator) sums)`` for one micro-batch [B, T+1]."""
        T = batch.shape[1] - 1
        gold_prob = self.cfg.schedule(step, T)  # [T], traced
        coin_key, dropout_key = jax.random.split(key)
        mask = None if self.pad_id is None else batch[:, 1:] != self.pad_id
        loss, aux = ss_loss(
            model, batch, coin_key, gold_prob, self.cfg, mask=mask, dropout_rng=dropout_key if self.dropout else None
        )
        n, n_rep = aux["n_tokens"], aux["n_replaceable"].astype(jnp.float32)
        metrics = {
            "pass1_loss": (aux["pass1_loss"] * n, n),
            "pass2_loss": (aux["pass2_loss"] * n, n),
            "gold_prob": (aux["gold_prob"] * n_rep, n_rep),
            "mix_rate": (aux["n_fed"].astype(jnp.float32), n_rep),
            "differ_rate": (aux["n_differ"].astype(jnp.float32), n_rep),
        }
        return loss * n, n, metrics  # the sum, so micro-batches combine by token count
