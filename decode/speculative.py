"""Speculative decoding: a drafter proposes k tokens, the target checks them in one forward pass over k+1 tokens.

Everything runs in one jitted ``lax.while_loop`` (Leviathan et al. 2023; Chen et al. 2023). Each round:

1. the drafter proposes k tokens per row: a smaller model of the same vocabulary sampling from its own
   filtered distribution q (``DraftModel``), or the continuation of the last n-gram's most recent
   earlier occurrence in the row's own prompt and output (``PromptLookup``: q is a point mass);
2. the target runs once over ``[pending, d1..dk]`` and gives its filtered distributions p1..p(k+1),
   with the same filters as plain sampling (repetition penalty counting the drafts before each position);
3. draft i is accepted with probability min(1, p(di)/q(di)); at the first rejection a token is drawn
   from norm(max(0, p - q)) instead; when all k are accepted the bonus token comes from p(k+1).
   Each emitted token is then distributed exactly as plain sampling's (greedy: the target's argmax).

Rows advance by their own counts: every row has its own cache slot (``KVCache.index`` [B]), output
column and position; EOS inside a block ends the row there; ``max_new_tokens`` is exact. A row's
last emitted token ("pending") is not yet in either cache: the next round feeds it first. Rejected
drafts leave stale cache slots past a row's end; the next round's block overwrites them before any
query can see them (a slot's key position is above every query until then).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arjax.decode.sampling import SamplingParams, filter_logits, sample
from arjax.decode.step import RUNNING, emit, prefill, prompt_presence
from arjax.model import KVCache, Transformer, init_cache
from arjax.model.cache import write_slots


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """A smaller model of the same vocabulary (and tokenizer) proposes ``k`` tokens per round."""

    model: Transformer
    k: int = 4


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Drafts copied from the row's own text: the ``k`` tokens that followed the most recent earlier
    occurrence of its last ``ngram`` tokens (shorter n-grams when there is none). No second model."""

    ngram: int = 3
    k: int = 8


def check_draft(draft, target: Transformer) -> None:
    """One-line errors for a drafter that cannot serve this target."""
    if not isinstance(draft, (DraftModel, PromptLookup)):
        raise ValueError(
            f"draft must be DraftModel(model, k=...) or PromptLookup(ngram=..., k=...), got {type(draft).__name__}"
        )
    k = draft.k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 64:
        raise ValueError(f"draft k={k!r} must be an int in 1..64 (tokens proposed per round; 4-8 is typical)")
    if isinstance(draft, PromptLookup):
        n = draft.ngram
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 16:
            raise ValueError(f"PromptLookup ngram={n!r} must be an int in 1..16")
        return
    if not isinstance(draft.model, Transformer):
        raise ValueError(f"DraftModel.model must be an arjax Transformer, got {type(draft.model).__name__}")
    if draft.model.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary has {draft.model.cfg.vocab_size} ids but the target's has "
            f"{target.cfg.vocab_size}; a draft must share the target's vocabulary and tokenizer"
        )


@struct.dataclass
class SpecState:
    """The speculative loop's carry (B rows, W output slots, H history slots, V vocabulary)."""

    cache: KVCache  # target: every emitted token but `pending`; index [B] is pending's slot
    draft_cache: Any  # the draft model's, same contract; None for prompt lookup
    pending: jax.Array  # [B] int32: the last emitted token, fed first next round
    prev: jax.Array  # [B] int32: the token before it (re-fed to the draft, see _propose_model)
    positions: jax.Array  # [B] int32: position of `pending`
    history: jax.Array  # [B, H] int32: prompt then output, left-aligned (prompt lookup reads it)
    history_len: jax.Array  # [B] int32
    rng: jax.Array
    max_steps: jax.Array  # [] int32: max_new_tokens
    done: jax.Array  # [B] bool
    lengths: jax.Array  # [B] int32: tokens emitted
    tokens: jax.Array  # [B, W] int32
    logprobs: jax.Array  # [B, W] float32: raw (temperature 1) target log-probabilities
    stop_reason: jax.Array  # [B] int32
    presence: jax.Array  # [B, V] bool: prompt and output tokens (repetition penalty)
    rounds: jax.Array  # [] int32: target forward passes after prefill
    drafted: jax.Array  # [B] int32: drafts proposed while the row ran
    accepted: jax.Array  # [B] int32: drafts accepted


def _repeat_rows(sampling: SamplingParams, n: int) -> SamplingParams:
    """Each row's sampling values repeated n times: [B] -> [B * n] (row-major with the block axis)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), sampling)


def _block_probs(logits: jax.Array, sampling: SamplingParams, presence: jax.Array) -> jax.Array:
    """Filtered probabilities [B, K, V] of logits [B, K, V] with per-position presence [B, K, V]."""
    B, K, V = logits.shape
    filtered = filter_logits(logits.reshape(B * K, V), _repeat_rows(sampling, K), presence.reshape(B * K, V))
    return jax.nn.softmax(filtered, axis=-1).reshape(B, K, V)


def _block_presence(presence: jax.Array, drafts: jax.Array) -> jax.Array:
    """[B, k+1, V]: what the repetition penalty sees at each block position (the drafts before it)."""
    V = presence.shape[-1]
    seen = jnp.cumsum(jax.nn.one_hot(drafts, V, dtype=jnp.int32), axis=1) > 0  # [B, k, V]
    return jnp.concatenate([presence[:, None], presence[:, None] | seen], axis=1)


def _propose_model(draft: Transformer, state: SpecState, sampling: SamplingParams, key, k: int):
    """k drafts [B, k] sampled from the draft's filtered q, q [B, k, V], and the draft's cache.

    The first forward feeds ``[prev, pending]``: when the last round accepted all k drafts, the
    k-th was never fed to the draft, and ``prev`` is it; otherwise ``prev`` is already in the draft
    cache, and writing it again at its own slot writes the same keys and values.
    """
    cache = state.draft_cache.replace(index=state.cache.index - 1)
    logits, cache = draft(
        jnp.stack([state.prev, state.pending], 1), jnp.stack([state.positions - 1, state.positions], 1), cache
    )
    V = logits.shape[-1]

    def propose(logits, presence, key):
        q = jax.nn.softmax(filter_logits(logits, sampling, presence), axis=-1)  # [B, V]
        d = sample(key, logits, sampling, presence)  # [B]: a draw from q (argmax for greedy rows)
        return d, q, presence | (jnp.arange(V) == d[:, None])

    def step(carry, xs):  # propose draft i, then feed it to get the draft's next distribution
        logits, cache, presence = carry
        key, i = xs
        d, q, presence = propose(logits, presence, key)
        logits, cache = draft(d[:, None], (state.positions + 1 + i)[:, None], cache)
        return (logits[:, 0], cache, presence), (d, q)

    keys = jax.random.split(key, k)
    (logits, cache, presence), (ds, qs) = jax.lax.scan(
        step, (logits[:, -1], cache, state.presence), (keys[:-1], jnp.arange(k - 1))
    )
    d_last, q_last, _ = propose(logits, presence, keys[-1])  # the k-th draft is not fed (see above)
    drafts = jnp.concatenate([ds.T, d_last[:, None]], axis=1)  # [B, k]
    q = jnp.concatenate([qs.transpose(1, 0, 2), q_last[:, None]], axis=1)  # [B, k, V]
    return drafts, q, cache


def lookup_drafts(history: jax.Array, history_len: jax.Array, *, ngram: int, k: int) -> jax.Array:
    """[B, k] drafts: the tokens after the most recent earlier occurrence of each row's last n tokens
    (n = ngram, then shorter), read from ``history`` [B, H] (valid up to ``history_len``). Rows with no
    occurrence propose their last token repeated (the target then rejects cheaply)."""
    B, H = history.shape
    j = jnp.arange(H)
    length = history_len[:, None]
    start = jnp.full((B,), -1, jnp.int32)  # where the proposed continuation starts
    for n in range(ngram, 0, -1):
        tail = jnp.take_along_axis(history, jnp.clip(length - n + jnp.arange(n), 0, H - 1), axis=1)  # [B, n]
        match = jnp.ones((B, H), bool)
        for i in range(n):
            shifted = jnp.pad(history[:, i:], ((0, 0), (0, i)), constant_values=-1)  # shifted[:, j] = history[:, j+i]
            match &= shifted == tail[:, i : i + 1]
        # An earlier occurrence with at least one token after it (not the tail itself).
        found = match & (j + n < length) & (length > n)
        latest = jnp.max(jnp.where(found, j + n, -1), axis=1).astype(jnp.int32)
        start = jnp.where(start < 0, latest, start)
    idx = start[:, None] + jnp.arange(k)
    last = jnp.take_along_axis(history, jnp.clip(length - 1, 0, H - 1), axis=1)  # [B, 1]
    ok = (start[:, None] >= 0) & (idx < length)
    return jnp.where(ok, jnp.take_along_axis(history, jnp.clip(idx, 0, H - 1), axis=1), last).astype(jnp.int32)


def accept_drafts(u: jax.Array, p_d: jax.Array, q_d: jax.Array) -> jax.Array:
    """The rejection rule: accept draft d with probability min(1, p(d) / q(d)), as ``u * q(d) < p(d)``
    for u ~ U[0, 1) (q(d) > 0: d was drawn from q). A point-mass draft (q = 1) is accepted with p(d);
    a greedy target's p is one-hot, so only its argmax is accepted."""
    return u * q_d < p_d


def spec_round(
    target: Transformer,
    draft: Transformer | None,
    state: SpecState,
    sampling: SamplingParams,
    eos_ids: jax.Array,
    *,
    k: int,
    ngram: int,
    pad_id,
) -> SpecState:
    """One round: propose k, verify in one target pass over k+1 tokens, emit 1..k+1 tokens per row."""
    B, V = state.presence.shape
    rng, key_draft, key_accept, key_extra = jax.random.split(state.rng, 4)
    if draft is not None:
        drafts, q, draft_cache = _propose_model(draft, state, sampling, key_draft, k)  # [B, k], [B, k, V]
    else:
        drafts = lookup_drafts(state.history, state.history_len, ngram=ngram, k=k)
        q = jax.nn.one_hot(drafts, V, dtype=jnp.float32)  # a point mass on each draft
        draft_cache = None

    # The target's distributions at the k+1 block positions, one forward pass.
    block = jnp.concatenate([state.pending[:, None], drafts], axis=1)  # [B, k+1]
    raw, cache = target(block, state.positions[:, None] + jnp.arange(k + 1), state.cache)  # [B, k+1, V]
    p = _block_probs(raw, sampling, _block_presence(state.presence, drafts))  # [B, k+1, V]

    # Accept draft i with probability min(1, p(d)/q(d)), i.e. u * q(d) < p(d); stop at the first rejection.
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(key_accept, (B, k))
    n_acc = jnp.sum(jnp.cumprod(accept_drafts(u, p_d, q_d), axis=1), axis=1).astype(jnp.int32)  # [B] in 0..k
    # The extra token: from norm(max(0, p - q)) at the first rejection, from p after k acceptances.
    p_n = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]  # [B, V]
    q_ext = jnp.concatenate([q, jnp.zeros((B, 1, V), q.dtype)], axis=1)
    q_n = jnp.take_along_axis(q_ext, n_acc[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)  # p == q: never reached
    extra = jax.random.categorical(key_extra, jnp.log(residual), axis=-1).astype(jnp.int32)  # [B]

    # Emitted: d1..d_n, then the extra token; cut at EOS and at max_new_tokens; nothing for done rows.
    col = jnp.arange(k + 1)
    proposal = jnp.where(col < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), extra[:, None])  # [B, k+1]
    em = emit(
        raw,
        proposal,
        done=state.done,
        emitted=state.lengths,
        max_steps=state.max_steps,
        eos=eos_ids,
        pad_id=pad_id,
        proposed=n_acc + 1,
    )
    count, running = em.count, em.running  # [B]: tokens kept; rows that ran this round
    last = jnp.take_along_axis(proposal, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    before = jnp.take_along_axis(proposal, jnp.maximum(count - 2, 0)[:, None], axis=1)[:, 0]
    moved = count > 0
    new_index = state.cache.index + count  # the new pending's slot (the old one and the accepted drafts are valid)
    return SpecState(
        cache=cache.replace(index=new_index),
        draft_cache=None if draft_cache is None else draft_cache.replace(index=new_index),
        pending=jnp.where(moved, last, state.pending),
        prev=jnp.where(count >= 2, before, jnp.where(moved, state.pending, state.prev)),
        positions=state.positions + count,
        history=write_slots(state.history, em.tokens, state.history_len, axis=1),
        history_len=state.history_len + count,
        rng=rng,
        max_steps=state.max_steps,
        done=em.done(state.done),
        lengths=state.lengths + count,
        tokens=write_slots(state.tokens, em.tokens, state.lengths, axis=1),
        logprobs=write_slots(state.logprobs, em.logprobs, state.lengths, axis=1),
        stop_reason=em.stop_reason(state.stop_reason),
        presence=em.seen(state.presence),
        rounds=state.rounds + 1,
        drafted=state.drafted + jnp.where(running, k, 0),
        accepted=state.accepted + jnp.where(running, n_acc, 0),  # as verified, before any cut at EOS or the limit
    )


def spec_start(
    target,
    draft,
    tokens,
    positions,
    rng,
    max_steps,
    sampling,
    eos_ids,
    pad_id,
    *,
    num_slots: int,
    cache_len: int,
    k: int,
    cache_dtype=None,
) -> SpecState:
    """Prefill the prompt into the target's (and the draft's) cache and emit the first token.
    ``cache_dtype``: ``init_cache``'s (None: the model's; "int8": int8 keys and values with scales)."""
    B, P = tokens.shape
    logits, cache = prefill(target, tokens, positions, init_cache(target.cfg, B, cache_len, cache_dtype))
    draft_cache = None
    if draft is not None:
        _, draft_cache = prefill(draft, tokens, positions, init_cache(draft.cfg, B, cache_len, cache_dtype))
    presence = prompt_presence(tokens, positions >= 0, logits.shape[-1])  # [B, V]
    rng, key = jax.random.split(rng)
    em = emit(
        logits,
        sample(key, logits, sampling, presence),
        done=jnp.zeros((B,), bool),
        emitted=0,
        max_steps=max_steps,
        eos=eos_ids,
        pad_id=pad_id,
    )
    first = em.tokens  # [B]
    W = num_slots + k + 1
    prompt_len = jnp.max(positions, axis=1) + 1  # [B]
    H = P + W
    j = jnp.arange(H)
    src = jnp.clip(P - prompt_len[:, None] + j, 0, P - 1)  # left-align the left-padded prompt
    history = jnp.where(j < prompt_len[:, None], jnp.take_along_axis(tokens, src, axis=1), pad_id)
    history = jnp.where(j == prompt_len[:, None], first[:, None], history).astype(jnp.int32)
    index = jnp.full((B,), P, jnp.int32)  # the first token's slot: right after the (padded) prompt
    return SpecState(
        cache=cache.replace(index=index),
        draft_cache=None if draft_cache is None else draft_cache.replace(index=index),
        pending=first,
        prev=tokens[:, -1].astype(jnp.int32),
        positions=prompt_len.astype(jnp.int32),
        history=history,
        history_len=(prompt_len + 1).astype(jnp.int32),
        rng=rng,
        max_steps=jnp.asarray(max_steps, jnp.int32),
        done=em.done(jnp.zeros((B,), bool)),
        lengths=em.new,
        tokens=jnp.full((B, W), pad_id, jnp.int32).at[:, 0].set(first),
        logprobs=jnp.zeros((B, W), jnp.float32).at[:, 0].set(em.logprobs),
        stop_reason=em.stop_reason(jnp.full((B,), RUNNING, jnp.int32)),
        presence=em.seen(presence),
        rounds=jnp.zeros((), jnp.int32),
        drafted=jnp.zeros((B,), jnp.int32),
        accepted=jnp.zeros((B,), jnp.int32),
    )


def spec_loop(target, draft, state: SpecState, sampling, eos_ids, pad_id, limit, *, k: int, ngram: int) -> SpecState:
    """Rounds until every row is done or ``state.rounds`` reaches ``limit`` (traced)."""
    return jax.lax.while_loop(
        lambda s: (s.rounds < limit) & ~jnp.all(s.done),
        lambda s: spec_round(target, draft, s, sampling, eos_ids, k=k, ngram=ngram, pad_id=pad_id),
        state,
    )
