"""Scheduled sampling for transformers: two-pass, K-pass parallel and exact sequential objectives, and their jitted train step.

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
  ScheduledSamplingConfig              frozen, keyword-only, strict (``from_dict`` refuses unknown keys)
  make_schedule, GoldSchedule          re-exported from ``arjax.train.schedules``
  draw_coins(key, gold_prob, B, T, granularity) -> use_model [B, T] bool
  ss_loss(model, tokens, key, gold_prob, cfg, *, mask=None, dropout_rng=None) -> (loss, aux)
  make_ss_train_step(graphdef, tx, cfg, *, seed, use_dropout=False, pad_id=None)
      -> ss_train_step(params, opt_state, batches [A, B, T+1], step, schedule=cfg.schedule)
         -> (params, opt_state, metrics)

``aux`` / ``metrics`` carry, every step: ``gold_prob`` (the scheduled probability, mean over
replaceable inputs), ``mix_rate`` (the realised fraction of replaceable inputs fed by the model),
``differ_rate`` (the fraction whose fed-back token differs from gold; for mixtures, the argmax of
the mixture), and ``pass1_loss`` / ``pass2_loss``. A run whose ``differ_rate`` stays at 0 is
teacher forcing in disguise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arjax.model.cache import init_cache
from arjax.model.config import strict_from_dict
from arjax.train.loss import next_token_loss
from arjax.train.schedules import GoldSchedule, as_gold_schedule, constant, make_schedule
from arjax.train.step import step_key

__all__ = [
    "ScheduledSamplingConfig",
    "GoldSchedule",
    "make_schedule",
    "draw_coins",
    "ss_loss",
    "make_ss_train_step",
    "from_dict",
]

_CHOICES = {
    "method": ("parallel", "sequential"),
    "feed": ("argmax", "sample", "soft", "soft_topk", "gumbel"),
    "granularity": ("token", "sequence", "prefix"),
}
_SOFT_FEEDS = ("soft", "soft_topk", "gumbel")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduledSamplingConfig:
    """Everything static about the scheduled-sampling objective (the schedule's numbers stay traced)."""

    method: Literal["parallel", "sequential"] = "parallel"
    num_passes: int = 2  # parallel only: 2 = two-pass (Mihaylova & Martins), K > 2 = Duckworth et al.
    feed: Literal["argmax", "sample", "soft", "soft_topk", "gumbel"] = "sample"
    temperature: float = 1.0  # sampling temperature (sample, soft, soft_topk) or Gumbel-softmax tau (gumbel)
    top_k: int = 0  # soft_topk only: the mixture is over the k most likely tokens
    gumbel_hard: bool = False  # gumbel only: feed the one-hot argmax, gradient of the soft sample (straight-through)
    granularity: Literal["token", "sequence", "prefix"] = "token"
    # Gradient into the earlier pass through what is fed back (mixtures only: a drawn token has none).
    grad_through_pass1: bool = False
    pass1_weight: float = 0.0  # weight of the teacher-forced (pass 1) loss
    pass2_weight: float = 1.0  # weight of the scheduled-sampling (last pass / sequential) loss
    schedule: GoldSchedule = dataclasses.field(default_factory=lambda: GoldSchedule(step=constant(1.0)))

    def __post_init__(self):
        for name in ("num_passes", "top_k"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"ScheduledSamplingConfig.{name}={getattr(self, name)!r} should be int")
        for name in ("temperature", "pass1_weight", "pass2_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"ScheduledSamplingConfig.{name}={v!r} should be a number")
        for name in ("gumbel_hard", "grad_through_pass1"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ScheduledSamplingConfig.{name}={getattr(self, name)!r} should be bool")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"ScheduledSamplingConfig.{name}={getattr(self, name)!r}; choose one of {choices}")
        if self.method == "parallel" and self.num_passes < 2:
            raise ValueError(f"num_passes={self.num_passes}: parallel scheduled sampling needs at least 2 passes")
        if self.method == "sequential" and self.num_passes != 2:
            raise ValueError(f"num_passes={self.num_passes} applies to method='parallel' only; leave it at 2 for 'sequential'")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0; use feed='argmax' for greedy feedback")
        if self.feed == "soft_topk" and self.top_k < 1:
            raise ValueError(f"feed='soft_topk' needs top_k >= 1, got top_k={self.top_k}")
        if self.feed != "soft_topk" and self.top_k != 0:
            raise ValueError(f"top_k={self.top_k} is used only by feed='soft_topk' (feed={self.feed!r}); leave it at 0")
        if self.gumbel_hard and self.feed != "gumbel":
            raise ValueError(f"gumbel_hard=True needs feed='gumbel', got feed={self.feed!r}")
        if self.pass1_weight < 0 or self.pass2_weight < 0 or self.pass1_weight + self.pass2_weight == 0:
            raise ValueError(
                f"loss weights pass1_weight={self.pass1_weight}, pass2_weight={self.pass2_weight} must be >= 0 and not both 0"
            )
        object.__setattr__(self, "schedule", as_gold_schedule(self.schedule))

    @property
    def soft(self) -> bool:
        return self.feed in _SOFT_FEEDS

    def replace(self, **overrides: Any) -> "ScheduledSamplingConfig":
        return from_dict({**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **overrides})


def from_dict(d: dict[str, Any]) -> ScheduledSamplingConfig:
    """Strict: an unknown key is an error, never silently ignored."""
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
    """Teacher-forced pass 1, then K-1 passes each fed from the previous one; logits of pass 1 and pass K."""
    drop = lambda i: None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    logits1, _ = model(inputs, dropout_rng=drop(1))  # [B, T, V]
    logits = logits1
    fed_tokens = inputs
    for k in range(2, cfg.num_passes + 1):
        prev = logits if cfg.grad_through_pass1 else jax.lax.stop_gradient(logits)
        # The prediction made at t-1 (for token t) replaces input t: shift right by one.
        fed_tokens, fed_emb = _feed(model, _shift_right(prev), jax.random.fold_in(key, k), cfg)
        tok, emb = _mix(model, inputs, use_model, fed_tokens, fed_emb)
        logits, _ = model(tok, embeddings=emb, dropout_rng=drop(k))  # [B, T, V]
    return logits1, logits, fed_tokens


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
            raise ValueError("method='sequential' with token feeds runs decode_step, which has no dropout; use dropout=0")
        logits, fed = _sequential_decode(model, inputs, use_model, key, cfg)
    return logits1, logits, fed


def _sequential_decode(model, inputs, use_model, key, cfg):
    """Token feeds through ``decode_step``: prefill x_0, then one forced token per step."""
    from arjax.decode import SamplingParams, decode_step, init_state, prefill, sample

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

    objective = _sequential if cfg.method == "sequential" else _parallel
    logits1, logits2, fed_tokens = objective(model, inputs, targets, use_model, feed_key, cfg, dropout_rng)

    loss2, n = next_token_loss(logits2, targets, mask)
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


# ----------------------------------------------------------------------------- the train step


def make_ss_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    cfg: ScheduledSamplingConfig,
    *,
    seed: int,
    use_dropout: bool = False,
    pad_id: int | None = None,
):
    """``ss_train_step(params, opt_state, batches [A, B, T+1], step, schedule=cfg.schedule)``
    ``-> (params, opt_state, metrics)``.

    The same shape as the teacher-forced ``arjax.train.step.make_train_step`` (same optimizer,
    micro-batches scanned and weighted by token count, params and optimizer state donated), with
    the scheduled-sampling loss. ``step`` and ``schedule`` are traced: the gold probability
    changes every step without recompiling, and so do the schedule's numbers (k, c, eps_min);
    only a different schedule family (``kind``) or ``combine`` is a new program.
    """
    if not isinstance(cfg, ScheduledSamplingConfig):
        raise ValueError(f"cfg={cfg!r}: pass a ScheduledSamplingConfig")
    if use_dropout and cfg.method == "sequential" and not cfg.soft:
        raise ValueError(
            f"method='sequential' with feed={cfg.feed!r} runs the decoder's decode_step, which has no dropout; "
            "train with dropout=0 or use method='parallel'"
        )

    def micro_loss(params, batch, key, gold_prob, dropout_rng):
        model = nnx.merge(graphdef, params)
        mask = None if pad_id is None else batch[:, 1:] != pad_id
        loss, aux = ss_loss(model, batch, key, gold_prob, cfg, mask=mask, dropout_rng=dropout_rng)
        aux = {k: v for k, v in aux.items() if k not in ("use_model", "fed_tokens")}
        return loss * aux["n_tokens"], aux  # summed, so micro-batches combine by token count

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batches, step, schedule):
        key = step_key(seed, step)  # (seed, step) alone: a resumed run draws the same coins
        T = batches.shape[-1] - 1
        gold_prob = schedule(step, T)  # [T], traced

        def micro(carry, xs):
            grads_acc, sums = carry
            batch, i = xs
            k = jax.random.fold_in(key, i)
            rng = jax.random.fold_in(k, 1_000_003) if use_dropout else None
            (loss_sum, aux), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, batch, k, gold_prob, rng)
            n = aux["n_tokens"]
            new = {
                "loss": loss_sum,
                "pass1_loss": aux["pass1_loss"] * n,
                "pass2_loss": aux["pass2_loss"] * n,
                "tokens": n,
                "n_fed": aux["n_fed"].astype(jnp.float32),
                "n_differ": aux["n_differ"].astype(jnp.float32),
                "n_replaceable": aux["n_replaceable"].astype(jnp.float32),
                "gold_sum": aux["gold_prob"] * aux["n_replaceable"],
            }
            sums = {k_: sums[k_] + new[k_] for k_ in sums}
            return (jax.tree.map(jnp.add, grads_acc, grads), sums), None

        names = ("loss", "pass1_loss", "pass2_loss", "tokens", "n_fed", "n_differ", "n_replaceable", "gold_sum")
        zeros = {k_: jnp.zeros((), jnp.float32) for k_ in names}
        A = batches.shape[0]
        (grads, s), _ = jax.lax.scan(
            micro, (jax.tree.map(jnp.zeros_like, params), zeros), (batches, jnp.arange(A))
        )
        n = jnp.maximum(s["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        n_rep = jnp.maximum(s["n_replaceable"], 1.0)
        metrics = {
            "loss": s["loss"] / n,
            "pass1_loss": s["pass1_loss"] / n,
            "pass2_loss": s["pass2_loss"] / n,
            "grad_norm": optax.tree.norm(grads),
            "tokens": s["tokens"],
            "gold_prob": s["gold_sum"] / n_rep,
            "mix_rate": s["n_fed"] / n_rep,
            "differ_rate": s["n_differ"] / n_rep,
            "n_differ": s["n_differ"],
        }
        return params, opt_state, metrics

    def ss_train_step(params, opt_state, batches, step, schedule=None):
        if batches.ndim != 3:
            raise ValueError(
                f"batches has shape {batches.shape}; pass [A micro-batches, B, T+1] (add a leading axis of 1 for one batch)"
            )
        schedule = cfg.schedule if schedule is None else as_gold_schedule(schedule)
        return train_step(params, opt_state, batches, jnp.asarray(step, jnp.int32), schedule)

    ss_train_step.jitted = train_step  # for compile counting in tests and benchmarks
    return ss_train_step
