"""The serving engine: a fixed set of slots decoded together in jitted chunks; requests join and leave between chunks.

Continuous batching, as JetStream's orchestrator does it. The device holds ``Slots``: one static
batch of S rows (the slots), each with its own KV-cache row, write index, position, sampling values,
PRNG key, EOS ids, token budget and token history (prompt then output). Jitted programs act on it,
donating it:

- ``prefill``: the next piece of R waiting prompts, one row each, in one pass (a prompt longer than
  ``prefill_chunk`` goes in pieces between chunks; a stored prefix is copied in first). A prompt's
  first piece overwrites every field its slot reads, so a reused slot never sees its previous occupant.
- ``chunk``: up to ``chunk_steps`` decode steps for the slots in use (``lax.while_loop``; finished
  slots ride along masked), returning the tokens each slot emitted. Requests take the lowest free
  slot and a chunk runs over the first 1, 2, 4, ... slots that hold them, so a lightly loaded server
  does not pay for its idle slots. One program per such row count.

The host (``Engine.step``: one thread owns the device state) admits waiting requests into free
slots between chunks, hands each request its new tokens and text, checks stop strings, and releases
finished or cancelled slots. A request's tokens do not depend on which slot it lands in or on what
else is running: its key chain is ``generate``'s for a batch of one (``sample`` with per-row keys),
so greedy and seeded output equal a solo ``generate`` call with the same prompt and seed.

Speculative decoding by prompt lookup (``prompt_lookup=K``): each step of the chunk draws the slot's
next token as the plain step does, proposes the K tokens that followed the latest earlier occurrence
of its last n-gram in its own history (``lookup_drafts``), and runs the model once over those K + 1
tokens. Draft i is accepted iff it equals the token the plain step would draw there (same logits,
key and penalty set: sample and compare), so every emitted token is the plain engine's, greedy or
seeded; a slot advances by its own count, 1 to K + 1 tokens a step. Rejected drafts leave cache
entries past the slot's last token; the slot's next block starts there and overwrites them before
attending. Cache rows hold K + 1 slots past ``max_len`` so that no block is ever cut at the end.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import sys
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from arjax.decode.loop import DEFAULT_BUCKETS, EOS_SLOTS, TRACE_COUNTS, bucket, check_prompt, eos_array
from arjax.decode.sampling import FieldError, SamplingParams, SamplingValues, request_sampling, sample, sampling_values
from arjax.decode.speculative import lookup_drafts
from arjax.decode.step import RUNNING, STOP_NAMES, STOP_STRING, Emitted, emit, prompt_presence
from arjax.decode.stops import StopStrings
from arjax.model import KVCache, Transformer, init_cache
from arjax.model.cache import write_slots
from arjax.model.memory import Need, check_needs, kv_cache_bytes, loaded_needs
from arjax.model.quant import check_kv_cache_dtype
from arjax.model.rng import check_seed, seed_key
from arjax.model.sharding import cache_sharding, mesh_of, placement

# With prompt lookup, a plain chunk in a row of this many runs speculatively anyway (Engine._chunk_kind).
LOOKUP_PROBE = 8
TOP_LOGPROBS = 5  # the most alternatives a request may ask for per token (OpenAI's limit for completions)


class QueueFull(RuntimeError):
    """The engine cannot take the request now: its queue is full (retry later: HTTP 429), the request
    alone needs more than slots + max_queue places (``never``: it will never fit), or the engine is
    shutting down (``closing``)."""

    def __init__(self, message: str, *, never: bool = False, closing: bool = False):
        super().__init__(message)
        self.never, self.closing = never, closing


@struct.dataclass
class Slots:
    """Everything the device keeps per slot; S slots, V vocabulary, L cache slots per row, E EOS ids."""

    cache: KVCache  # per layer [S, Hkv, L, Dh]; index [S]: each row's next cache slot
    history: jax.Array  # [S, L] int32: the prompt then the emitted tokens, `positions` of them (prompt lookup)
    logits: jax.Array  # [S, V] float32: raw logits for each slot's next token
    positions: jax.Array  # [S] int32: position of each slot's next token
    keys: jax.Array  # [S] PRNG keys: each slot's chain, split once per token as generate splits its key
    count: jax.Array  # [S] int32: tokens the slot's request has emitted (its EOS included)
    max_new: jax.Array  # [S] int32: the request's max_new_tokens
    done: jax.Array  # [S] bool: finished, cancelled or free (those rows are masked)
    eos: jax.Array  # [S, E] int32: the request's EOS ids, -1 padded
    sampling: SamplingParams  # [S] per slot
    presence: jax.Array  # [S, V] bool: tokens in the prompt or output (repetition penalty)
    stop_reason: jax.Array  # [S] int32: RUNNING, STOP_EOS or STOP_LENGTH


@struct.dataclass
class ChunkOut:
    """What one chunk emitted, C = chunk_steps * (tokens a step may emit: 1, or K + 1 with prompt lookup)
    columns; a slot's new tokens are its first ``new[s]``."""

    tokens: jax.Array  # [S, C] int32
    logprobs: jax.Array  # [S, C] float32: under the raw model distribution (as generate's)
    top_ids: jax.Array  # [S, C, K] int32: the K most likely tokens at each step (K = TOP_LOGPROBS)
    top_logprobs: jax.Array  # [S, C, K] float32
    new: jax.Array  # [S] int32
    passes: jax.Array  # [S] int32: steps the slot ran (one model pass each)
    accepted: jax.Array  # [S] int32: its new tokens beyond one a pass (accepted drafts)


@struct.dataclass
class Store:
    """The prefix store's device side: E rows like a slot's, each the prefix of a prompt prefilled earlier."""

    cache: KVCache  # per layer [E, Hkv, L, Dh]
    history: jax.Array  # [E, L] int32: the prompt's tokens


def _empty_cache(cfg, rows: int, cache_len: int, cache_dtype) -> KVCache:
    """``rows`` empty cache rows with an index each. With prompt lookup they run K + 1 slots past
    ``max_len``, which only rejected drafts use: past a model's learned positions too (``hidden`` clips
    those positions; their outputs are never emitted)."""
    cache = init_cache(cfg.replace(max_len=max(cfg.max_len, cache_len)), rows, cache_len, cache_dtype)
    return cache.replace(index=jnp.zeros((rows,), jnp.int32))


def _empty_slots(cfg, num_slots: int, cache_len: int, cache_dtype) -> Slots:
    S, V = num_slots, cfg.vocab_size
    return Slots(
        cache=_empty_cache(cfg, S, cache_len, cache_dtype),
        history=jnp.zeros((S, cache_len), jnp.int32),
        logits=jnp.zeros((S, V), jnp.float32),
        positions=jnp.zeros((S,), jnp.int32),
        keys=jax.random.split(jax.random.key(0), S),
        count=jnp.zeros((S,), jnp.int32),
        max_new=jnp.zeros((S,), jnp.int32),
        done=jnp.ones((S,), bool),
        eos=jnp.full((S, EOS_SLOTS), -1, jnp.int32),
        sampling=SamplingParams.greedy(S),
        presence=jnp.zeros((S, V), bool),
        stop_reason=jnp.full((S,), RUNNING, jnp.int32),
    )


def _empty_store(cfg, entries: int, cache_len: int, cache_dtype) -> Store:
    """``entries`` rows like a slot's (at least one, never read when the store is off)."""
    E = max(entries, 1)
    return Store(cache=_empty_cache(cfg, E, cache_len, cache_dtype), history=jnp.zeros((E, cache_len), jnp.int32))


def _prefill_impl(
    graphdef,
    params,
    slots: Slots,
    store: Store,
    tokens,
    start,
    total,
    slot,
    first,
    final,
    src,
    src_len,
    key,
    max_new,
    eos,
    sampling: SamplingParams,
) -> Slots:
    """Prefill one piece of R prompts (one row each) into their slots, in one parallel pass.

    tokens [R, P]: row r holds prompt tokens at positions start[r] .. start[r] + P - 1 (padding past
    the prompt's ``total[r]`` tokens). slot [R]: the slot each row fills; a padding row names slot S and
    is dropped. first [R]: the request's first piece: its row starts empty, or (``src[r] >= 0``) from the
    prefix store's entry ``src[r]``, whose first ``src_len[r]`` cache slots hold this prompt's prefix.
    Otherwise the row continues what earlier pieces wrote (a long prompt prefilled in chunks). final [R]:
    the piece ends the prompt: the slot takes the request's settings and starts decoding (its logits are
    the last prompt token's). A slot whose prompt is unfinished stays ``done`` (masked by ``chunk``).
    Every field a slot reads is overwritten on its first piece: nothing of a previous occupant survives.
    The slot's history gets the piece's prompt tokens at their positions (a stored prefix's with its cache).
    """
    TRACE_COUNTS["engine_prefill"] += 1
    model = nnx.merge(graphdef, params)
    R, P = tokens.shape
    c, sc = slots.cache, store.cache
    S, L = c.pos.shape
    V = slots.logits.shape[1]
    at = jnp.clip(slot, 0, S - 1)
    from_store = first & (src >= 0)
    entry = jnp.clip(src, 0, sc.pos.shape[0] - 1)

    def pick(slot_buf, store_buf):  # [S, ...] and [E, ...] -> this piece's rows [R, ...]
        mine = jnp.take(slot_buf, at, axis=0)
        stored = jnp.take(store_buf, entry, axis=0).astype(mine.dtype)
        return jnp.where(from_store.reshape((R,) + (1,) * (mine.ndim - 1)), stored, mine)

    def pick_layers(slot_bufs, store_bufs):
        return None if slot_bufs is None else tuple(pick(a, b) for a, b in zip(slot_bufs, store_bufs))

    cols = jnp.arange(L)
    pos = pick(c.pos, sc.pos)
    # A first piece sees only the stored prefix (if any): every other cache slot of its row is empty.
    keep = ~first[:, None] | (from_store[:, None] & (cols < src_len[:, None]))
    rows = KVCache(
        k=pick_layers(c.k, sc.k),
        v=pick_layers(c.v, sc.v),
        pos=jnp.where(keep, pos, -1),
        index=start,
        k_scale=pick_layers(c.k_scale, sc.k_scale),
        v_scale=pick_layers(c.v_scale, sc.v_scale),
    )
    # This piece's prompt tokens at their positions; the rest of the row (a stored prefix, earlier pieces;
    # past the prompt, anything: nothing reads it) as it was.
    offset = cols - start[:, None]  # [R, L]
    mine = (offset >= 0) & (offset < P) & (cols < total[:, None])
    history = jnp.where(
        mine, jnp.take_along_axis(tokens, jnp.clip(offset, 0, P - 1), axis=1), pick(slots.history, store.history)
    )
    p = start[:, None] + jnp.arange(P)
    positions = jnp.where(p < total[:, None], p, -1).astype(jnp.int32)  # [R, P]
    h, rows = model.hidden(tokens, positions, rows)  # [R, P, D]; cache slots start .. start + P - 1 written
    last = jnp.clip(total - 1 - start, 0, P - 1)
    logits = model.logits(jnp.take_along_axis(h, last[:, None, None], axis=1))[:, 0]  # [R, V]: the last prompt token

    def put(big, small, where=None):  # rows [R, ...] into the slots at `slot`; padding rows (slot S) dropped
        idx = slot if where is None else jnp.where(where, slot, S)
        return big.at[idx].set(small.astype(big.dtype), mode="drop")

    def put_layers(big, small):
        return None if big is None else tuple(put(b, x) for b, x in zip(big, small))

    cache = KVCache(
        k=put_layers(c.k, rows.k),
        v=put_layers(c.v, rows.v),
        pos=put(c.pos, rows.pos),
        index=put(c.index, jnp.minimum(start + P, total)),
        k_scale=put_layers(c.k_scale, rows.k_scale),
        v_scale=put_layers(c.v_scale, rows.v_scale),
    )
    # The repetition penalty's set: this piece's tokens, added to what earlier pieces saw (a stored
    # prefix's tokens are not in it: the store serves only requests without a penalty).
    seen = prompt_presence(tokens, positions >= 0, V) | (jnp.take(slots.presence, at, axis=0) & ~first[:, None])
    zeros = jnp.zeros((R,), jnp.int32)
    return Slots(
        cache=cache,
        history=put(slots.history, history),
        logits=put(slots.logits, logits.astype(jnp.float32), final),
        positions=put(slots.positions, jnp.where(final, total, -1)),
        keys=put(slots.keys, jax.random.wrap_key_data(key), final),
        count=put(slots.count, zeros),
        max_new=put(slots.max_new, max_new, final),
        done=put(slots.done, ~final),
        eos=put(slots.eos, eos, final),
        sampling=jax.tree.map(lambda a, r: put(a, r, final), slots.sampling, sampling),
        presence=put(slots.presence, seen),
        stop_reason=put(slots.stop_reason, jnp.full((R,), RUNNING, jnp.int32)),
    )


def _save_prefix_impl(store: Store, slots: Slots, slot, entry) -> Store:
    """Copy slot ``slot``'s cache row and history (a prompt just prefilled) into the prefix store's ``entry``."""
    TRACE_COUNTS["engine_save_prefix"] += 1
    c, sc = slots.cache, store.cache

    def copy(big, small):
        return big.at[entry].set(small[slot].astype(big.dtype))

    def copy_layers(big, small):
        return None if big is None else tuple(copy(b, x) for b, x in zip(big, small))

    cache = KVCache(
        k=copy_layers(sc.k, c.k),
        v=copy_layers(sc.v, c.v),
        pos=copy(sc.pos, c.pos),
        index=sc.index,
        k_scale=copy_layers(sc.k_scale, c.k_scale),
        v_scale=copy_layers(sc.v_scale, c.v_scale),
    )
    return Store(cache=cache, history=copy(store.history, slots.history))


def _score_impl(graphdef, params, tokens, n):
    """The prompt's own log-probabilities (``echo`` with logprobs): tokens [1, P], the first ``n`` real.
    Returns logprob [P] of token t given the tokens before it (row t - 1 of the teacher-forced pass; 0
    for t = 0 and padding) and the TOP_LOGPROBS most likely alternatives at each t, [P, K] ids and
    log-probabilities."""
    TRACE_COUNTS["engine_score"] += 1
    model = nnx.merge(graphdef, params)
    P = tokens.shape[1]
    positions = jnp.where(jnp.arange(P) < n, jnp.arange(P), -1)[None].astype(jnp.int32)
    h, _ = model.hidden(tokens, positions)
    logp = jax.nn.log_softmax(model.logits(h)[0], axis=-1)  # [P, V]: row t predicts token t + 1
    K = min(TOP_LOGPROBS, logp.shape[-1])
    top_lp, top_ids = jax.lax.top_k(logp, K)
    nxt = jnp.take_along_axis(logp[:-1], tokens[0, 1:, None], axis=-1)[:, 0]  # [P - 1]
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])
    return jnp.concatenate([jnp.zeros((1,), jnp.float32), nxt]), shift(top_ids), shift(top_lp)


def _plain_step(model, s: Slots, pad_id) -> tuple[Slots, Emitted, None]:
    """One decode step: each running slot draws a token (its key split once, as ``generate``'s
    ``rng, key = split(rng)``) and the model runs on it. Returns the slots, what was emitted, and the
    logits of the step's later tokens (it has none)."""
    split = jax.vmap(jax.random.split)(s.keys)  # [S, 2]
    drawn = sample(split[:, 1], s.logits, s.sampling, s.presence)  # [S]
    em = emit(s.logits, drawn, done=s.done, emitted=s.count, max_steps=s.max_new, eos=s.eos, pad_id=pad_id)
    logits, cache = model(em.tokens[:, None], s.positions[:, None], s.cache)  # [S, 1, V]
    # Rows that were not running do not advance (they wrote one slot past their data, never read).
    cache = cache.replace(index=jnp.where(em.running, cache.index, s.cache.index))
    # The history gets the token too (prompt lookup's chunks, when the engine switches to them, draft from it).
    history = jnp.where(em.running[:, None], write_slots(s.history, em.tokens[:, None], s.positions, axis=1), s.history)
    s = s.replace(
        cache=cache,
        history=history,
        logits=logits[:, 0].astype(jnp.float32),
        positions=s.positions + em.new,
        keys=jnp.where(em.running, split[:, 0], s.keys),
        count=s.count + em.new,
        done=em.done(s.done),
        presence=em.seen(s.presence),
        stop_reason=em.stop_reason(s.stop_reason),
    )
    return s, em, None


def _lookup_step(model, s: Slots, pad_id, k: int, ngram: int) -> tuple[Slots, Emitted, jax.Array]:
    """One speculative step by prompt lookup: each running slot emits 1 to k + 1 tokens, the ones that
    as many plain steps would emit, for one model pass over k + 1 tokens.

    Block token 0 is drawn as the plain step draws it; tokens 1..k are drafts, the continuation of the
    latest earlier occurrence of the slot's last ``ngram`` tokens in its history (token 0 included).
    After the model's pass, the token after ``block[:, :j]`` is drawn as the plain step would draw it
    there (logits[:, j - 1], the key chain split j + 1 times, the penalty counting ``block[:, :j]``),
    and draft j is kept iff it equals that draw and every draft before it was kept. The first draw that
    differs is not emitted: it is the next step's token 0 (the same logits, key and penalty set), so
    every emitted token is in the cache and ``logits`` are again those after the slot's last token.
    Returns the slots, what was emitted (a block [S, k + 1]), and the logits tokens 1..k were drawn from.
    """
    S, V = s.logits.shape
    running = ~s.done
    chain, subkeys = [s.keys], []  # chain[j]: the slot's key after j tokens; subkeys[j] draws token j
    for _ in range(k + 1):
        pair = jax.vmap(jax.random.split)(chain[-1])
        chain.append(pair[:, 0])
        subkeys.append(pair[:, 1])
    first = sample(subkeys[0], s.logits, s.sampling, s.presence)  # [S]: the plain step's token
    history = write_slots(s.history, first[:, None], s.positions, axis=1)  # a running slot holds `positions`
    drafts = lookup_drafts(history, s.positions + 1, ngram=ngram, k=k)  # [S, k]
    block = jnp.concatenate([first[:, None], drafts], axis=1)  # [S, k + 1]
    # A row not running writes position -1 (masked) from its index (<= max_len: the spare slots hold it).
    positions = jnp.where(running[:, None], s.positions[:, None] + jnp.arange(k + 1), -1)
    logits, cache = model(block, positions, s.cache)  # [S, k + 1, V]: logits[:, j] follow block[:, j]
    logits = logits.astype(jnp.float32)

    # Sample and compare: the k draws as one batch of S * k rows, each with its own key and penalty set.
    seen = [s.presence | (block[:, :1] == jnp.arange(V))]
    for j in range(1, k):
        seen.append(seen[-1] | (block[:, j : j + 1] == jnp.arange(V)))
    presence = jnp.stack(seen, axis=1)  # [S, k, V]: what the penalty has seen before draft j + 1
    draws = sample(
        jnp.stack(subkeys[1:], axis=1).reshape(S * k),
        logits[:, :k].reshape(S * k, V),
        jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), s.sampling),
        presence.reshape(S * k, V),
    ).reshape(S, k)
    accepted = jnp.sum(jnp.cumprod(draws == drafts, axis=1), axis=1).astype(jnp.int32)  # [S] in 0..k
    em = emit(
        jnp.concatenate([s.logits[:, None], logits[:, :k]], axis=1),  # [S, k + 1, V]: each token drawn from
        block,
        done=s.done,
        emitted=s.count,
        max_steps=s.max_new,
        eos=s.eos,
        pad_id=pad_id,
        proposed=accepted + 1,
    )
    count = em.count  # [S]: cut at EOS and the budget; 0 for rows not running
    s = s.replace(
        cache=cache.replace(index=s.cache.index + count),
        history=jnp.where(running[:, None], write_slots(s.history, em.tokens, s.positions, axis=1), s.history),
        logits=jnp.take_along_axis(logits, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0],
        positions=s.positions + count,
        keys=jax.vmap(lambda keys, n: keys[n])(jnp.stack(chain, axis=1), count),
        count=s.count + count,
        done=em.done(s.done),
        presence=em.seen(s.presence),
        stop_reason=em.stop_reason(s.stop_reason),
    )
    return s, em, logits[:, :k]


def _chunk_impl(
    graphdef, chunk_steps, rows, lookup, params, all_slots: Slots, pad_id, steps, want_logprobs
) -> tuple[Slots, ChunkOut]:
    """Up to ``steps`` (<= ``chunk_steps``, traced: one program serves both) decode steps for every running
    slot among the first ``rows`` (static; the others are free), stopping early when none runs. Returns
    the slots and the chunk's ``rows`` outputs. ``lookup`` (static): (K, ngram) for speculative steps by
    prompt lookup (``_lookup_step``: up to K + 1 tokens a step), (0, 0) for plain ones. The
    log-probabilities (the token's and the top alternatives, a softmax and a top-k over the vocabulary
    per token) are computed only when ``want_logprobs`` (traced) says a slot in the chunk asked for
    them; otherwise they are zeros."""
    TRACE_COUNTS["engine_chunk"] += 1
    model = nnx.merge(graphdef, params)
    k, ngram = lookup
    W = k + 1  # tokens a slot may emit per step
    # Few requests in flight: decode only the slots in use (they are the lowest; see Engine._rows).
    slots = all_slots if rows == all_slots.logits.shape[0] else jax.tree.map(lambda x: x[:rows], all_slots)
    S, V = slots.logits.shape
    top = min(TOP_LOGPROBS, V)
    C = chunk_steps * W
    out = ChunkOut(
        tokens=jnp.full((S, C), pad_id, jnp.int32),
        logprobs=jnp.zeros((S, C), jnp.float32),
        top_ids=jnp.zeros((S, C, top), jnp.int32),
        top_logprobs=jnp.zeros((S, C, top), jnp.float32),
        new=jnp.zeros((S,), jnp.int32),
        passes=jnp.zeros((S,), jnp.int32),
        accepted=jnp.zeros((S,), jnp.int32),
    )

    def cond(carry):
        s, _, i = carry
        return (i < steps) & ~jnp.all(s.done)

    def logprobs_of(first, rest, tokens, keep):
        """Each token's log-probability and the top alternatives under the raw logits it was drawn from:
        ``first`` [S, V] for tokens[:, 0], ``rest`` [S, W - 1, V] (None when W = 1) for the others."""

        def under(logits, tokens):  # [S, n, V], [S, n]
            logp = jax.nn.log_softmax(logits, axis=-1)
            top_lp, top_ids = jax.lax.top_k(logp, top)
            return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], top_ids.astype(jnp.int32), top_lp

        parts = [under(first[:, None], tokens[:, :1])] + ([] if rest is None else [under(rest, tokens[:, 1:])])
        chosen, top_ids, top_lp = (jnp.concatenate(x, axis=1) for x in zip(*parts))
        return jnp.where(keep, chosen, 0.0), top_ids, top_lp

    def no_logprobs(first, rest, tokens, keep):
        return jnp.zeros((S, W), jnp.float32), jnp.zeros((S, W, top), jnp.int32), jnp.zeros((S, W, top), jnp.float32)

    def body(carry):
        s, o, i = carry
        new_s, em, rest = _plain_step(model, s, pad_id) if k == 0 else _lookup_step(model, s, pad_id, k, ngram)
        tokens = em.tokens.reshape(S, W)
        keep = jnp.arange(W) < em.new[:, None]  # [S, W]
        chosen, top_ids, top_lp = jax.lax.cond(want_logprobs, logprobs_of, no_logprobs, s.logits, rest, tokens, keep)
        at = i if k == 0 else o.new  # plain: column i (a row runs from the chunk's first step until it ends)
        o = o.replace(
            tokens=write_slots(o.tokens, tokens, at, axis=1),
            logprobs=write_slots(o.logprobs, chosen, at, axis=1),
            top_ids=write_slots(o.top_ids, top_ids, at, axis=1),
            top_logprobs=write_slots(o.top_logprobs, top_lp, at, axis=1),
            new=o.new + em.new,
            passes=o.passes + em.running,
            accepted=o.accepted + em.new - em.running,
        )
        return new_s, o, i + 1

    slots, out, _ = jax.lax.while_loop(cond, body, (slots, out, jnp.zeros((), jnp.int32)))
    if rows < all_slots.logits.shape[0]:  # back into the (donated) whole
        slots = jax.tree.map(lambda full, part: full.at[:rows].set(part), all_slots, slots)
    return slots, out


def _release_impl(slots: Slots, mask) -> Slots:
    """Mark the slots in ``mask`` [S] done (a stop string, a cancelled request): they stop costing steps."""
    TRACE_COUNTS["engine_release"] += 1
    return slots.replace(done=slots.done | mask)


_prefill = jax.jit(_prefill_impl, static_argnums=(0,), donate_argnums=(2,))
_save_prefix = jax.jit(_save_prefix_impl, donate_argnums=(0,))
_score = jax.jit(_score_impl, static_argnums=(0,))
_chunk = jax.jit(_chunk_impl, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
_release = jax.jit(_release_impl, donate_argnums=(0,))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request(SamplingValues):
    """One generation request. ``prompt``: token ids. The sampling values (temperature, top_k, top_p,
    min_p, repetition_penalty) are ``SAMPLING_FIELDS``, inherited from ``SamplingValues`` with their
    defaults (temperature 0 is greedy). ``top_logprobs``: how many alternatives (0..5) to report per
    token; ``logprobs``: report each token's own log-probability (implied by ``top_logprobs``; otherwise
    the update's ``logprobs`` are zeros: the engine computes them only for chunks where a slot asked).
    ``prompt_logprobs`` (None or 0..5): the prompt tokens' log-probabilities and that many alternatives,
    in the first update. ``stop``: strings that end the request (the engine needs a tokenizer for them)."""

    prompt: Sequence[int]
    max_new_tokens: int = 16
    seed: int = 0
    eos_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    top_logprobs: int = 0
    logprobs: bool = False  # compute each token's log-probability (top_logprobs > 0 implies it); else zeros
    prompt_logprobs: int | None = None  # None: not computed; k in 0..5: each prompt token's log-prob, k alternatives


@dataclasses.dataclass
class Update:
    """What the engine hands a request's callback after a chunk: the new tokens and text since the
    last update (text never holds half a UTF-8 character or anything a stop string removes).
    ``finish_reason`` is set on the last update: 'eos', 'length', 'stop' (a stop string), 'cancelled' or
    'error' (the round failed; the engine's thread said why on stderr)."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens emitted so far in all (the final count when finished)
    # First update of a request with prompt_logprobs: one entry per prompt token, the first None.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclasses.dataclass(eq=False)
class _Active:
    """A request the engine holds: waiting, or decoding in ``slot``."""

    request: Request
    tokens: np.ndarray  # [n] int32 prompt
    sampling: SamplingParams  # [1]
    eos: np.ndarray  # [E] int32
    on_update: Callable[[Update], None]
    stops: StopStrings
    slot: int | None = None
    out: list = dataclasses.field(default_factory=list)  # emitted token ids
    cancelled: bool = False
    submitted: float = 0.0
    filled: int = 0  # prompt tokens in the slot's cache so far (a long prompt is prefilled in pieces)
    prefilling: bool = False  # holds a slot whose prompt is not complete yet (not decoding)
    reused: int = 0  # prompt tokens taken from the prefix store
    prefix_entry: int = -1  # the store entry they come from
    prompt_lp: tuple | None = None  # (logprobs, top ids, top logprobs) for the first update
    accept: float = float("inf")  # prompt lookup: drafts accepted per step, recent average (unknown: try it)

    def last_update(self, reason: str) -> Update:
        """The last update of a request that ends without new tokens: 'cancelled' or 'error'."""
        return Update(
            tokens=[],
            logprobs=[],
            top_logprobs=None,
            text="",
            finish_reason=reason,
            prompt_tokens=int(self.tokens.size),
            completion_tokens=len(self.out),
        )


class Handle:
    """A submitted request: ``cancel()`` frees its slot at the next chunk boundary (or drops it from the queue)."""

    def __init__(self, active: _Active, engine: Engine):
        self._active, self._engine = active, engine

    def cancel(self) -> None:
        self._engine._cancel(self._active)


class PrefixTable:
    """The host side of the prefix store: which stored row holds which prompt prefix, evicted LRU.

    Prefixes are whole blocks of ``block`` tokens. Each stored entry (a cache row on the device) is
    the prefix of one prompt, its first ``length`` tokens; a key for every whole-block prefix of it
    (the exact token bytes, so two prompts match only when their tokens are equal) points at the
    entry, so a later prompt finds its longest stored prefix by looking up its own block prefixes,
    longest first. A matched entry is moved to the back of the LRU order; a new prefix takes the
    front entry, dropping its keys."""

    def __init__(self, entries: int, block: int):
        self.block = block
        self.keys: dict[bytes, tuple[int, int]] = {}  # block prefix -> (entry, its length)
        self.held: list[bytes | None] = [None] * entries  # each entry's whole stored prefix
        self.lru = collections.OrderedDict((e, None) for e in range(entries))
        self.hits = self.lookups = self.tokens_reused = 0

    def match(self, tokens: np.ndarray) -> tuple[int, int]:
        """(entry, length) of the longest stored prefix of ``tokens`` that leaves at least one token to
        prefill (the last prompt token's logits come from the prefill), or (-1, 0)."""
        tokens = np.asarray(tokens, np.int32)
        self.lookups += 1
        for m in range((tokens.size - 1) // self.block * self.block, 0, -self.block):
            hit = self.keys.get(tokens[:m].tobytes())
            if hit is not None:
                self.lru.move_to_end(hit[0])
                self.hits += 1
                self.tokens_reused += m
                return hit[0], m
        return -1, 0

    def covered(self, tokens: np.ndarray) -> bool:
        """Whether the store already holds every whole block of ``tokens`` worth storing."""
        m = (tokens.size - 1) // self.block * self.block
        return m == 0 or np.asarray(tokens[:m], np.int32).tobytes() in self.keys

    def holds(self, entry: int, prefix: np.ndarray) -> bool:
        """Whether ``entry`` still starts with ``prefix`` (a later ``add`` may have taken it)."""
        data = np.asarray(prefix, np.int32).tobytes()
        return self.held[entry] is not None and self.held[entry][: len(data)] == data

    def unmatch(self, length: int) -> None:
        """Take back a ``match`` of ``length`` tokens that was not used (its entry was taken first)."""
        self.hits -= 1
        self.tokens_reused -= length

    def add(self, tokens: np.ndarray) -> int:
        """Reserve the LRU entry for ``tokens``' whole-block prefix (at least one token left out);
        returns the entry, whose device row the caller then fills."""
        tokens = np.asarray(tokens, np.int32)
        m = (tokens.size - 1) // self.block * self.block
        entry, _ = self.lru.popitem(last=False)
        self.lru[entry] = None
        step = self.block * 4  # bytes of one block of int32 ids
        old = self.held[entry]
        if old is not None:  # evicted: its keys go, unless another entry holds the same prefix
            for k in range(step, len(old) + 1, step):
                if self.keys.get(old[:k], (None,))[0] == entry:
                    del self.keys[old[:k]]
        data = tokens[:m].tobytes()
        self.held[entry] = data
        for k in range(step, len(data) + 1, step):
            self.keys[data[:k]] = (entry, k // 4)
        return entry


class Engine:
    """Continuous batching over ``slots`` rows of ``max_len`` cache slots each.

    ``submit(request, on_update)`` is thread-safe; ``on_update`` is called from the thread that runs
    ``step`` (or, for a request cancelled while still queued, from the thread that cancels it)
    (``start()`` runs it in a background thread that owns the device state; batch jobs call
    ``run_until_done`` instead). Requests wait in a FIFO queue of at most ``max_queue`` (then
    ``submit`` raises ``QueueFull``). ``warmup()`` compiles every program serving can need (a prefill per
    piece width and row count, a chunk per row bucket); after it,
    no prompt length up to ``max_len`` and no sampling value compiles anything (``TRACE_COUNTS``).
    ``prompt_lookup=K`` (1..64; 0: off) decodes speculatively, K drafts a step from the slot's last
    ``lookup_ngram`` tokens' latest earlier occurrence in its prompt and output, with the plain engine's
    tokens (see the module docstring); ``stats["spec_steps"]`` and ``stats["spec_accepted"]`` count the
    steps slots ran and the drafts they emitted in speculative chunks (``stats["spec_chunks"]``). A chunk
    speculates only while the decoding requests' recent accepted drafts per step average at least
    ``lookup_threshold`` (new requests are tried; 0: always): sampled or never-repeating text decodes at
    the plain engine's speed (see ``_chunk_kind``).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        slots: int = 16,
        max_len: int | None = None,
        chunk_steps: int = 8,
        tokenizer=None,
        pad_id: int = 0,
        max_queue: int = 256,
        kv_cache_dtype: str | None = None,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        prefill_chunk: int = 512,
        prefill_tokens: int = 2048,
        prefix_cache: int = 0,
        prefix_block: int = 16,
        prompt_lookup: int = 0,
        lookup_ngram: int = 3,
        lookup_threshold: float = 1.0,
    ):
        cfg = model.cfg
        for name, value, lo in (
            ("slots", slots, 1),
            ("chunk_steps", chunk_steps, 1),
            ("max_queue", max_queue, 0),
            ("prefill_chunk", prefill_chunk, 1),
            ("prefill_tokens", prefill_tokens, 1),
            ("prefix_cache", prefix_cache, 0),
            ("prefix_block", prefix_block, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value < 2**31:
                raise ValueError(f"{name}={value!r} must be an int >= {lo}")
        for name, value, lo, hi, what in (
            ("prompt_lookup", prompt_lookup, 0, 64, "drafts per step; 0 turns prompt lookup off, 4-8 is typical"),
            ("lookup_ngram", lookup_ngram, 1, 16, "the n-gram prompt lookup matches"),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r} must be an int in {lo}..{hi} ({what})")
        most = prompt_lookup if prompt_lookup else 64  # no more drafts than K can be accepted in a step
        if (
            isinstance(lookup_threshold, bool)
            or not isinstance(lookup_threshold, (int, float, np.integer, np.floating))
            or not 0 <= lookup_threshold <= most
        ):
            raise ValueError(
                f"lookup_threshold={lookup_threshold!r} must be a number in 0..{most} (accepted drafts a step, "
                "at most prompt_lookup, worth a speculative chunk; 0 always speculates)"
            )
        max_len = cfg.max_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
            raise ValueError(f"max_len={max_len!r} must be an int >= 2 (cache slots per request: prompt + new tokens)")
        if cfg.pos == "learned" and max_len > cfg.max_len:
            raise ValueError(
                f"max_len={max_len} exceeds the model's max_len={cfg.max_len} (learned positions end "
                f"there); use max_len <= {cfg.max_len}"
            )
        if not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < cfg.vocab_size:
            raise ValueError(f"pad_id={pad_id!r} must be a token id in [0, {cfg.vocab_size})")
        self.model, self.tokenizer = model, tokenizer
        self.num_slots, self.max_len, self.chunk_steps = int(slots), int(max_len), int(chunk_steps)
        self.pad_id, self.max_queue = int(pad_id), int(max_queue)
        self.prompt_lookup, self.lookup_ngram = int(prompt_lookup), int(lookup_ngram)
        # A speculative step writes K + 1 cache slots from a row's index (at most max_len): spare room, so
        # that no block is ever cut at the row's end. The history has the same length.
        self.cache_len = self.max_len + (self.prompt_lookup + 1 if self.prompt_lookup else 0)
        self.lookup_threshold = float(lookup_threshold)
        # _chunk's static `lookup` for each kind of chunk the engine runs: plain, and speculative if on.
        self._kinds = ((0, 0),) + (((self.prompt_lookup, self.lookup_ngram),) if self.prompt_lookup else ())
        self._plain_chunks = 0  # plain chunks in a row since the last speculative one
        # Prompt widths: the buckets below max_len, and max_len itself (a prompt may fill all but one slot).
        self.buckets = tuple(sorted({b for b in buckets if b < self.max_len} | {self.max_len}))
        # Chunks run over the first 1, 2, 4, ... slots when only those are in use: one request in
        # flight costs a batch of one, not of every slot. One chunk program per row count.
        self.row_buckets = tuple(sorted({2**i for i in range(32) if 2**i < self.num_slots} | {self.num_slots}))
        # Prefill: a prompt longer than prefill_chunk goes in pieces of that many tokens (a bucket), one
        # piece per round, so running streams keep flowing; each round prefills at most prefill_tokens
        # (at least one piece), R waiting pieces of one width together. One program per (width, rows).
        self.prefill_chunk = bucket(min(int(prefill_chunk), self.max_len), self.buckets)
        self.piece_buckets = tuple(b for b in self.buckets if b <= self.prefill_chunk)
        self.prefill_tokens = max(int(prefill_tokens), self.prefill_chunk)
        self.prefill_shapes = tuple(
            (P, R) for P in self.piece_buckets for R in self.row_buckets if R == 1 or self.prefill_tokens >= R * P
        )
        self.prefix = PrefixTable(int(prefix_cache), int(prefix_block)) if prefix_cache else None
        self._store_rows = max(int(prefix_cache), 1)
        self._key_shape = jax.random.key_data(seed_key(0)).shape  # a key's words ([2] for threefry)
        self._graphdef, self._params = nnx.split(model)
        self._cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self._placement = placement(self._params)  # from the mesh/device, not from any one parameter
        self._check_memory()
        self._slots = self._fresh_slots()
        self._store = self._fresh_store()
        self.broken: str | None = None  # set when the engine could not recover from a failed round
        self._by_slot: list[_Active | None] = [None] * self.num_slots
        self._queue: collections.deque[_Active] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = False
        self.stats = collections.Counter()  # tokens, chunks, requests finished: for /health and the bench

    # ---- the API edge: every check happens here, in the caller's thread ----
    def check(self, request: Request) -> tuple[np.ndarray, SamplingParams, np.ndarray, StopStrings]:
        """The request's prompt, sampling values, EOS ids and stop strings, checked: a FieldError (a
        ValueError) naming the bad field and value."""
        V = self.model.cfg.vocab_size
        try:
            prompt = check_prompt(request.prompt, V)
        except ValueError as e:
            raise FieldError("prompt", str(e)) from None
        m = request.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise FieldError("max_new_tokens", f"max_new_tokens={m!r} must be an int >= 1")
        if prompt.size + m > self.max_len:
            room = self.max_len - prompt.size
            if room >= 1:
                raise FieldError(
                    "max_new_tokens",
                    f"prompt ({prompt.size} tokens) + max_new_tokens ({m}) = "
                    f"{prompt.size + m} exceeds the {self.max_len} tokens a slot holds; lower "
                    f"max_new_tokens to <= {room} or shorten the prompt",
                )
            raise FieldError(
                "prompt",
                f"prompt ({prompt.size} tokens) + max_new_tokens ({m}) = {prompt.size + m} "
                f"exceeds the {self.max_len} tokens a slot holds; shorten the prompt to at most "
                f"{self.max_len - 1} tokens",
            )
        try:
            check_seed(request.seed)
        except ValueError as e:
            raise FieldError("seed", str(e)) from None
        sampling = request_sampling(vocab_size=V, **sampling_values(request))
        try:
            eos = eos_array(request.eos_ids, V, width=EOS_SLOTS)
        except ValueError as e:
            raise FieldError("eos_ids", str(e)) from None
        k = request.top_logprobs
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= TOP_LOGPROBS:
            raise FieldError("top_logprobs", f"top_logprobs={k!r} must be an int in [0, {TOP_LOGPROBS}]")
        if not isinstance(request.logprobs, (bool, np.bool_)):
            raise FieldError("logprobs", f"logprobs={request.logprobs!r} must be True or False")
        k = request.prompt_logprobs
        if k is not None and (
            isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= TOP_LOGPROBS
        ):
            raise FieldError("prompt_logprobs", f"prompt_logprobs={k!r} must be None or an int in [0, {TOP_LOGPROBS}]")
        try:
            stops = StopStrings(
                self.tokenizer, [request.stop] if isinstance(request.stop, str) else list(request.stop), 1
            )
        except ValueError as e:
            raise FieldError("stop", str(e)) from None
        return prompt, sampling, eos, stops

    def submit(self, request: Request, on_update: Callable[[Update], None]) -> Handle:
        """Queue ``request``; ``on_update(Update)`` receives its tokens chunk by chunk. Raises ValueError
        (a bad request) or QueueFull."""
        return self.submit_all([(request, on_update)])[0]

    def submit_all(self, requests: Sequence[tuple[Request, Callable[[Update], None]]]) -> list[Handle]:
        """Queue several requests, all or none (one HTTP request's prompts and choices): each is checked
        first (ValueError), then they are queued together if the queue has room for all (QueueFull).

        ``max_queue`` counts requests waiting beyond the free slots: an idle engine with ``max_queue=0``
        takes up to ``slots`` requests at once."""
        checked = [(self.check(r), r, cb) for r, cb in requests]
        with self._lock:
            if self.broken:
                raise QueueFull(f"it failed and cannot decode ({self.broken}); restart it", closing=True)
            if self._closing:
                raise QueueFull("it is shutting down", closing=True)
            if len(requests) > self.num_slots + self.max_queue:
                raise QueueFull(
                    f"{len(requests)} completions in one request, but the engine decodes {self.num_slots} "
                    f"at once and queues {self.max_queue}",
                    never=True,
                )
            free = sum(a is None for a in self._by_slot)
            waiting = len(self._queue) + len(requests) - free
            if waiting > self.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} requests are waiting for {self.num_slots} slots (the queue holds "
                    f"{self.max_queue}); retry later"
                )
            now = time.perf_counter()
            actives = [
                _Active(request=r, tokens=tokens, sampling=sampling, eos=eos, on_update=cb, stops=stops, submitted=now)
                for (tokens, sampling, eos, stops), r, cb in checked
            ]
            self._queue.extend(actives)
            self._lock.notify()
        return [Handle(a, self) for a in actives]

    def _cancel(self, active: _Active) -> None:
        with self._lock:
            active.cancelled = True
            queued = active.slot is None and active in self._queue
            if queued:  # never prefilled; its place in the queue is free at once
                self._queue.remove(active)
            self._lock.notify()
        if queued:
            self._finish_quiet(active)

    def close(self) -> None:
        """Refuse new requests and cancel every one queued or decoding (a server shutting down): each
        ends with finish_reason 'cancelled' at the next round."""
        with self._lock:
            self._closing = True
            for a in list(self._queue) + [a for a in self._by_slot if a is not None]:
                a.cancelled = True
            self._lock.notify()

    @property
    def cache_bytes(self) -> int:
        """Bytes of the slots' KV cache (keys, values and, for int8, their scales)."""
        c = self._slots.cache
        return sum(x.nbytes for x in (*c.k, *c.v, *(c.k_scale or ()), *(c.v_scale or ())))

    @property
    def active(self) -> int:
        return sum(a is not None for a in self._by_slot)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # ---- the device side: only the thread that calls step() touches these ----
    def warmup(self) -> float:
        """Compile every program serving can need (a prefill per (piece width, rows), a chunk per row
        bucket, the prompt scorer per prompt bucket, the prefix copy, the release); returns seconds."""
        t0 = time.perf_counter()
        S = self.num_slots
        P0 = self.piece_buckets[0]
        most = max(R for P, R in self.prefill_shapes if P == P0)
        # Once: each program's inputs are placed as the fresh slots are (the `_slots`/`_store` setters put
        # every program's output back there), so what compiles here is what serving calls.
        # Every slot busy with a one-token request, then each chunk program in turn: the first of each
        # row count runs its loop body on that work (a first execution costs more than the next); the
        # others compile and run with every slot done.
        for start in range(0, S, most):
            self._run_prefill([(None, s, 0) for s in range(start, min(S, start + most))], P0, most, warm=True)
        for rows, want, kind in itertools.product(self.row_buckets, (False, True), self._kinds):
            self._run_chunk(rows, kind, self.chunk_steps, want)
        self._slots = _release(self._slots, self._put(np.ones((S,), bool)))
        for P, R in self.prefill_shapes:  # padding rows only (slot S): nothing lands in a slot
            self._run_prefill([], P, R)
        if self.prefix is not None:  # a copy into the store's first entry, which no key points at yet
            self._store = _save_prefix(self._store, self._slots, np.int32(0), np.int32(0))
        for P in self.buckets:
            _score(self._graphdef, self._params, self._put(np.zeros((1, P), np.int32)), np.int32(1))
        jax.block_until_ready((self._slots, self._store))
        return time.perf_counter() - t0

    def _run_prefill(self, pieces, P: int, R: int, warm: bool = False) -> None:
        """One prefill call of width P over R rows: ``pieces`` is a list of (active, slot, start) (at
        most R; the rest are padding rows). ``warm``: warm-up pieces with a one-token prompt and no
        request."""
        S, V = self.num_slots, self.model.cfg.vocab_size
        tokens = np.full((R, P), self.pad_id, np.int32)
        start = np.zeros(R, np.int32)
        total = np.ones(R, np.int32)
        slot = np.full(R, S, np.int32)
        first = np.ones(R, bool)
        final = np.ones(R, bool)
        src = np.full(R, -1, np.int32)
        src_len = np.zeros(R, np.int32)
        max_new = np.ones(R, np.int32)
        eos = np.full((R, EOS_SLOTS), -1, np.int32)
        keys = np.zeros((R, *self._key_shape), np.uint32)
        samplings = [SamplingParams.make(1, temperature=1.0, vocab_size=V)] * R
        for r, (a, where, at) in enumerate(pieces):
            slot[r], start[r] = where, at
            if warm:
                continue
            n = a.tokens.size
            tokens[r, : min(P, n - at)] = a.tokens[at : at + P]
            total[r] = n
            first[r] = a.filled == a.reused  # nothing of this request's own prefill is in its row yet
            final[r] = at + P >= n
            if first[r] and a.reused:
                src[r], src_len[r] = a.prefix_entry, a.reused
            max_new[r] = a.request.max_new_tokens
            eos[r] = a.eos
            keys[r], samplings[r] = np.asarray(jax.random.key_data(seed_key(a.request.seed))), a.sampling
        sampling = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *samplings)
        self._slots = _prefill(
            self._graphdef,
            self._params,
            self._slots,
            self._store,
            *(self._put(x) for x in (tokens, start, total, slot, first, final, src, src_len)),
            self._put(keys),
            self._put(max_new),
            self._put(eos),
            self._put(sampling),
        )

    def _run_chunk(self, rows: int, kind: tuple[int, int], steps: int, want: bool) -> ChunkOut:
        """One chunk program (``_chunk``) over the first ``rows`` slots: up to ``steps`` steps of the
        ``kind`` (plain or speculative), log-probabilities when ``want``. Returns its outputs."""
        self._slots, out = _chunk(
            self._graphdef,
            self.chunk_steps,
            rows,
            kind,
            self._params,
            self._slots,
            np.int32(self.pad_id),
            np.int32(steps),
            np.bool_(want),
        )
        return out

    def _take_waiting(self) -> list[_Active]:
        """Move waiting requests into free slots (the lowest first), dropping cancelled ones; a request
        whose first block equals that of another admitted in the same round, with nothing of it stored
        yet, waits a round so that it can reuse that one's prefix."""
        taken: list[_Active] = []
        firsts: set[bytes] = set()
        with self._lock:
            while self._queue and self._queue[0].cancelled:
                self._finish_quiet(self._queue.popleft())
            free = [i for i, a in enumerate(self._by_slot) if a is None]
            deferred = []
            while free and self._queue:
                active = self._queue.popleft()
                if active.cancelled:
                    self._finish_quiet(active)
                    continue
                active.prefix_entry, active.reused = -1, 0
                if self._reuses_prefix(active):
                    head = active.tokens[: self.prefix.block].tobytes()
                    active.prefix_entry, active.reused = self.prefix.match(active.tokens)
                    if not active.reused and head in firsts and active.tokens.size > self.prefix.block:
                        deferred.append(active)
                        continue
                    firsts.add(head)
                active.slot = free.pop(0)  # the slot is taken from here on (submit_all counts free slots)
                active.filled = active.reused
                active.prefilling = True
                self._by_slot[active.slot] = active
                taken.append(active)
            self._queue.extendleft(reversed(deferred))
        return taken

    def _reuses_prefix(self, active: _Active) -> bool:
        """The prefix store serves requests without a repetition penalty (a stored prefix's tokens are not
        in the slot's penalty set) and without prompt log-probabilities."""
        return (
            self.prefix is not None
            and float(np.asarray(active.sampling.repetition_penalty).reshape(-1)[0]) == 1.0
            and active.request.prompt_logprobs is None
        )

    def _prefill_round(self) -> bool:
        """Admit waiting requests and prefill the next piece of every unfinished prompt, at most
        ``prefill_tokens`` tokens (and at least one piece) this round. Returns whether a prompt finished
        (its request starts decoding)."""
        self._take_waiting()
        chosen: list[tuple[_Active, int]] = []  # (request, its piece's width)
        used, finished = 0, []
        for a in sorted((a for a in self._by_slot if a is not None and a.prefilling), key=lambda a: a.submitted):
            if a.reused and a.filled == a.reused and not self.prefix.holds(a.prefix_entry, a.tokens[: a.reused]):
                # Matched when admitted, but its first piece waited (the round's budget) while a finished
                # prompt took that entry: prefill it whole instead of copying another prompt's rows.
                self.prefix.unmatch(a.reused)
                a.prefix_entry, a.reused, a.filled = -1, 0, 0
            rem = a.tokens.size - a.filled
            P = self.prefill_chunk if rem > self.prefill_chunk else bucket(rem, self.piece_buckets)
            if used and used + P > self.prefill_tokens:
                break
            if a.request.prompt_logprobs is not None and a.prompt_lp is None:
                self._score_prompt(a)
            chosen.append((a, P))
            used += P
            if min(a.filled, self.max_len - P) + P >= a.tokens.size:
                finished.append(a)
        # One call per width, widest first; a call's rows beyond its own pieces (its row count is a
        # bucket) take the next narrower pieces, which cost nothing there: a narrower piece is a prompt's
        # last (only the widest, prefill_chunk, leaves tokens for later), so it ends at any width.
        queue = sorted(chosen, key=lambda x: -x[1])  # stable: first come first within a width
        while queue:
            P = queue[0][1]
            mine = sum(1 for _, w in queue if w == P)
            fits = [R for R in self.row_buckets if (P, R) in self.prefill_shapes]
            R = next((R for R in fits if mine <= R), fits[-1])
            group = [(a, a.slot, min(a.filled, self.max_len - P)) for a, _ in queue[:R]]
            self._run_prefill(group, P, R)
            for a, _, at in group:
                a.filled = min(a.tokens.size, at + P)
            queue = queue[R:]
        for a in finished:
            a.prefilling = False
            if self._reuses_prefix(a) and not self.prefix.covered(a.tokens):
                entry = self.prefix.add(a.tokens)
                self._store = _save_prefix(self._store, self._slots, np.int32(a.slot), np.int32(entry))
        self.stats["prefill_tokens"] += used
        return bool(finished)

    def _score_prompt(self, a: _Active) -> None:
        """The prompt's log-probabilities for the first update (``prompt_logprobs``)."""
        n = a.tokens.size
        P = bucket(n, self.buckets)
        padded = np.full((1, P), self.pad_id, np.int32)
        padded[0, :n] = a.tokens
        lp, ids, top = jax.device_get(_score(self._graphdef, self._params, self._put(padded), np.int32(n)))
        k = a.request.prompt_logprobs
        a.prompt_lp = (
            [None] + [float(x) for x in lp[1:n]],
            [None] + [[(int(t), float(v)) for t, v in zip(ids[j, :k], top[j, :k])] for j in range(1, n)],
        )

    def _chunk_kind(self) -> tuple[int, int]:
        """The chunk to run (``_chunk``'s static ``lookup``): speculative when the decoding requests'
        recent accepted drafts per step average at least ``lookup_threshold`` (a request not measured
        yet counts as worth it, so a new one is always tried), plain otherwise, with a speculative chunk
        every ``LOOKUP_PROBE``-th time so that text turning repetitive is noticed. A speculative step
        costs a pass over K + 1 tokens and the K extra draws; where drafts are rejected (sampled text,
        text that never repeats) it is slower than a plain one. Both give the same tokens."""
        if not self.prompt_lookup:
            return self._kinds[0]
        rates = [a.accept for a in self._by_slot if a is not None and not a.prefilling]
        if sum(rates) >= self.lookup_threshold * len(rates) or self._plain_chunks + 1 >= LOOKUP_PROBE:
            self._plain_chunks = 0
            return self._kinds[1]
        self._plain_chunks += 1
        return self._kinds[0]

    def _rows(self) -> int:
        """The smallest row bucket holding every slot in use (requests take the lowest free slot)."""
        last = max(i for i, a in enumerate(self._by_slot) if a is not None)
        return next(r for r in self.row_buckets if r > last)

    def _finish_quiet(self, active: _Active) -> None:
        active.on_update(active.last_update("cancelled"))

    def step(self, wait: float = 0.0) -> bool:
        """One round: admit waiting requests and prefill (a batch of whole prompts and the next piece
        of long ones), run one chunk, deliver its tokens, release finished slots. A round in which a
        prompt finished runs a chunk of one step, so new requests get their first token at once.

        Returns False when there was nothing to do (after waiting up to ``wait`` seconds for a request).
        """
        release = np.zeros(self.num_slots, bool)
        for i, a in enumerate(self._by_slot):  # cancelled while decoding
            if a is not None and a.cancelled:
                release[i] = True
                self._by_slot[i] = None
                self._finish_quiet(a)
        if release.any():  # before admitting: a new request may take a released slot
            self._slots = _release(self._slots, self._put(release))
        started = self._prefill_round()
        if not any(a is not None for a in self._by_slot):
            with self._lock:
                if not self._queue and wait > 0 and not self._stopping:
                    self._lock.wait(wait)
            return False
        if not any(a is not None and not a.prefilling for a in self._by_slot):
            return True  # only long prompts in their pieces: nothing decodes yet
        rows = self._rows()
        want = any(
            a is not None and not a.prefilling and (a.request.logprobs or a.request.top_logprobs) for a in self._by_slot
        )
        kind = self._chunk_kind()
        out = self._run_chunk(rows, kind, 1 if started else self.chunk_steps, want)
        out, done, reason = jax.device_get((out, self._slots.done, self._slots.stop_reason))
        self.stats["chunks"] += 1
        self.stats["slot_steps"] += int(out.passes.sum())  # one model pass per running slot and step
        if kind[0]:
            self.stats["spec_chunks"] += 1
            self.stats["spec_steps"] += int(out.passes.sum())
            self.stats["spec_accepted"] += int(out.accepted.sum())
            for i, a in enumerate(self._by_slot):  # each request's recent acceptance, for the next choice
                if a is not None and not a.prefilling and out.passes[i]:
                    rate = float(out.accepted[i]) / float(out.passes[i])
                    a.accept = rate if a.accept == float("inf") else (a.accept + rate) / 2
        release[:] = False
        for i, a in enumerate(self._by_slot):
            if a is None or a.prefilling:
                continue
            k = int(out.new[i])
            start = len(a.out)
            a.out.extend(int(t) for t in out.tokens[i, :k])
            ids = np.asarray(a.out, np.int32)
            finished = bool(done[i])
            reason_name = STOP_NAMES[int(reason[i])] if finished else None
            keep = len(a.out)
            text = ""
            try:
                if a.stops.stops or self.tokenizer is not None:
                    if a.stops.check(0, ids):  # a stop string: cut at the token that completed it
                        keep, finished, reason_name = a.stops.rows[0].cut, True, STOP_NAMES[STOP_STRING]
                        release[i] = not done[i]
                    text = a.stops.delta(0, ids[:keep], final=finished)
            except Exception as e:  # noqa: BLE001 (the tokenizer failed on this request: it alone ends)
                print(
                    f"arjax engine: decoding a request's text failed ({type(e).__name__}: {e}); it ends with an error",
                    file=sys.stderr,
                    flush=True,
                )
                finished, reason_name, release[i] = True, "error", not done[i]
            del a.out[keep:]
            n_new = max(0, keep - start)
            top = None
            if a.request.top_logprobs:
                top = [
                    [
                        (int(t), float(lp))
                        for t, lp in zip(
                            out.top_ids[i, j, : a.request.top_logprobs],
                            out.top_logprobs[i, j, : a.request.top_logprobs],
                        )
                    ]
                    for j in range(n_new)
                ]
            self.stats["tokens"] += n_new
            a.on_update(
                Update(
                    tokens=a.out[start:keep],
                    logprobs=[float(x) for x in out.logprobs[i, :n_new]],
                    top_logprobs=top,
                    text=text,
                    finish_reason=reason_name,
                    prompt_tokens=int(a.tokens.size),
                    completion_tokens=keep,
                    prompt_logprobs=None if a.prompt_lp is None or start else a.prompt_lp[0],
                    prompt_top_logprobs=None if a.prompt_lp is None or start else a.prompt_lp[1],
                )
            )
            if finished:
                self._by_slot[i] = None
                self.stats["finished"] += 1
        if release.any():
            self._slots = _release(self._slots, self._put(release))
        return True

    def _fail_all(self, error: Exception) -> None:
        """After a failed round: every request in flight or waiting ends with finish_reason 'error', and
        the slots start empty (the device state may be gone, e.g. donated to the call that failed).
        If even that fails (no memory for fresh slots), the engine is ``broken``: it refuses requests."""
        print(
            f"arjax engine: a decoding round failed ({type(error).__name__}: {error}); "
            "the requests in flight end with an error",
            file=sys.stderr,
            flush=True,
        )
        with self._lock:
            victims = [a for a in self._by_slot if a is not None] + list(self._queue)
            self._queue.clear()
        self._by_slot = [None] * self.num_slots
        for a in victims:  # first: whatever happens next, nobody waits forever
            # A callback that fails too has nobody left to tell.
            with contextlib.suppress(Exception):
                a.on_update(a.last_update("error"))
        self._slots = self._store = None  # let the old buffers go before making new ones
        if self.prefix is not None:  # the stored rows are gone with the store
            self.prefix = PrefixTable(len(self.prefix.held), self.prefix.block)
        try:
            self._slots = self._fresh_slots()
            self._store = self._fresh_store()
        except Exception as e:  # noqa: BLE001 (no memory for fresh slots, or any other failure: the engine turns broken)
            self.broken = f"{type(e).__name__}: {e}"
            print(
                f"arjax engine: cannot start over ({self.broken}); refusing requests from now on",
                file=sys.stderr,
                flush=True,
            )
            self.close()

    def _check_memory(self) -> None:
        """Refuse slots that cannot fit beside the weights, in one line, before any is allocated."""
        cfg, S, L, Lc, K = self.model.cfg, self.num_slots, self.max_len, self.cache_len, self.prompt_lookup
        mesh = mesh_of(self._params)
        shards = 1 if mesh is None else mesh.size  # weights and cache split over a mesh, at best evenly
        spare = f" (+{Lc - L} slots for prompt lookup's blocks)" if Lc > L else ""
        check_needs(
            [
                *loaded_needs(self._params, shards=shards),
                Need(
                    f"the KV cache of slots={S} x max_len={L}{spare}",
                    kv_cache_bytes(cfg, S, Lc, self._cache_dtype) // shards,
                    "lower slots (--slots) or max_len (--max-len)",
                ),
                Need(
                    f"the prefix store of {self._store_rows} rows x max_len={L}{spare}",
                    kv_cache_bytes(cfg, self._store_rows, Lc, self._cache_dtype) // shards,
                    "lower the prefix store's rows (--prefix-cache) or max_len (--max-len)",
                ),
                Need(
                    f"the slots' logits, token sets and histories (slots={S} x vocab_size={cfg.vocab_size})",
                    S * (cfg.vocab_size * 5 + Lc * 4),
                    "lower slots (--slots)",
                ),
                *(
                    [
                        Need(
                            f"prompt lookup's blocks (slots={S} x {K + 1} tokens x vocab_size={cfg.vocab_size})",
                            # the block's float32 logits, the draws' penalty sets, the sampler's filtered
                            # and penalised copies and a sort's, the log-probabilities' softmax
                            S * (K + 1) * cfg.vocab_size * 20,
                            "lower --prompt-lookup or slots (--slots)",
                        )
                    ]
                    if K
                    else []
                ),
            ],
            None if mesh is None else list(mesh.devices.flat),
        )

    def _fresh_slots(self) -> Slots:
        """Empty slots where the weights are (committed: the programs compiled by ``warmup`` take them
        without compiling again): on their device, or on their mesh with the cache's rows and KV heads
        split as ``generate`` splits its cache and every other field replicated."""
        cfg = self.model.cfg
        slots = _empty_slots(cfg, self.num_slots, self.cache_len, self._cache_dtype)
        shardings = jax.tree.map(lambda _: self._placement, slots)
        mesh = mesh_of(self._params)
        if mesh is not None:
            kv = cache_sharding(mesh, self.num_slots, cfg.num_kv_heads)
            shardings = shardings.replace(
                cache=shardings.cache.replace(k=tuple(kv for _ in slots.cache.k), v=tuple(kv for _ in slots.cache.v))
            )
        self._slot_shardings = shardings
        return jax.device_put(slots, shardings)

    # The device state, always placed as the fresh state is: each program's outputs come back with
    # their own notion of placement (a mesh's axis types, say), and a program's cache key includes its
    # inputs' placement, so without this the same program would compile again for another producer.
    @property
    def _slots(self) -> Slots:
        return self._slots_value

    @_slots.setter
    def _slots(self, value) -> None:
        self._slots_value = None if value is None else jax.device_put(value, self._slot_shardings)

    @property
    def _store(self) -> Store:
        return self._store_value

    @_store.setter
    def _store(self, value) -> None:
        self._store_value = None if value is None else jax.device_put(value, self._store_shardings)

    def _fresh_store(self) -> Store:
        """The prefix store's rows, placed like the slots' cache."""
        cfg = self.model.cfg
        entries = 0 if self.prefix is None else len(self.prefix.held)
        store = _empty_store(cfg, entries, self.cache_len, self._cache_dtype)
        shardings = jax.tree.map(lambda _: self._placement, store)
        mesh = mesh_of(self._params)
        if mesh is not None:
            c = store.cache
            kv = cache_sharding(mesh, c.pos.shape[0], cfg.num_kv_heads)
            shardings = shardings.replace(
                cache=shardings.cache.replace(k=tuple(kv for _ in c.k), v=tuple(kv for _ in c.v))
            )
        self._store_shardings = shardings
        return jax.device_put(store, shardings)

    def _put(self, x):
        """A host array (a prompt, EOS ids, a release mask) beside the weights."""
        return jax.device_put(x, self._placement)

    def _drain_broken(self) -> None:
        """A broken engine ends whatever is queued with an error (nothing can decode it) and idles."""
        with self._lock:
            victims = list(self._queue)
            self._queue.clear()
        for a in victims:
            a.on_update(a.last_update("error"))
        time.sleep(0.05)

    def run_until_done(self) -> None:
        """Step until nothing is queued or running (batch jobs, tests); in the calling thread."""
        while self.step() or self._queue:
            pass

    def start(self) -> None:
        """Run ``step`` in a background thread (the only one touching device state) until ``stop()``."""
        if self._thread is not None:
            return
        self._stopping = False

        def loop():
            while not self._stopping:
                try:
                    self.step(wait=0.05)
                except Exception as e:  # noqa: BLE001 (the server must outlive one bad round)
                    try:
                        self._fail_all(e)
                    except Exception:  # noqa: BLE001 (recovery failed too: mark the engine broken, keep the thread)
                        self.broken = self.broken or "recovery failed"
                        self.close()
                if self.broken:
                    self._drain_broken()

        self._thread = threading.Thread(target=loop, name="arjax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


__all__ = ["Engine", "Handle", "QueueFull", "Request", "Slots", "Update", "TOP_LOGPROBS"]
