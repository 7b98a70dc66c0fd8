"""One decode step for every loop: the decode state, the stop codes, and what a step emits.

``generate``/``stream`` (``decode/loop.py``), the serving engine's chunk (``decode/engine.py``) and the
speculative round (``decode/speculative.py``) draw their tokens differently (one key for the batch, a key
chain per slot, drafts verified k+1 at a time) but account for them with the one function here,
``emit``: which tokens each row keeps (none after its end, the rest ``pad_id``), their log-probabilities
under the raw model distribution, whether the row emitted an EOS id or reached its token budget, and the
tokens the repetition penalty has seen. This module imports nothing else of ``arjax.decode`` but
sampling, so every loop can build on it without an import cycle.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from arjax.decode.sampling import SamplingParams, sample
from arjax.model import KVCache, Transformer

# A row's stop_reason, held on the device; GenerateOutput and the engine's updates spell them out.
RUNNING, STOP_EOS, STOP_LENGTH, STOP_STRING = 0, 1, 2, 3
STOP_NAMES = {RUNNING: "running", STOP_EOS: "eos", STOP_LENGTH: "length", STOP_STRING: "stop"}


@struct.dataclass
class DecodeState:
    """Everything the plain decode loop carries; an immutable pytree, so the step is a pure function.

    B rows, N output slots, V vocabulary, S cache slots.
    """

    cache: KVCache
    logits: jax.Array  # [B, V] float32: raw model logits for the next token (from the last forward pass)
    positions: jax.Array  # [B] int32: position of the next token in each row
    rng: jax.Array  # PRNG key, split once per step
    step: jax.Array  # [] int32: tokens emitted so far (the next output column)
    max_steps: jax.Array  # [] int32: a row still running after this many tokens stops with 'length'
    done: jax.Array  # [B] bool
    lengths: jax.Array  # [B] int32: tokens emitted by each row, its EOS included
    tokens: jax.Array  # [B, N] int32: emitted tokens, pad_id after a row ends
    logprobs: jax.Array  # [B, N] float32: log p(token) under the raw model distribution, 0 after the end
    stop_reason: jax.Array  # [B] int32: RUNNING, STOP_EOS or STOP_LENGTH
    presence: jax.Array  # [B, V] bool: tokens seen in the prompt or output (repetition penalty)


@dataclasses.dataclass(frozen=True)
class Emitted:
    """What one step emitted (traced arrays). One token per row: ``tokens``/``logprobs`` are [B];
    a speculative block of K: [B, K], and ``count`` [B] says how many of them each row kept."""

    tokens: jax.Array  # [B] or [B, K] int32: pad_id where a row emits nothing
    logprobs: jax.Array  # like tokens, float32: log p under the raw logits (temperature 1), 0 where nothing
    logp: jax.Array  # [B, V] or [B, K, V]: log_softmax of the raw logits (top alternatives read it)
    running: jax.Array  # [B] bool: the row was still running before this step
    hit_eos: jax.Array  # [B] bool: the row ended on one of its EOS ids
    hit_len: jax.Array  # [B] bool: the row reached its token budget without an EOS
    count: jax.Array | None = None  # [B] int32 (blocks only): tokens kept, 0..K

    @property
    def new(self) -> jax.Array:
        """[B] int32: tokens each row emitted in this step."""
        return self.running.astype(jnp.int32) if self.count is None else self.count

    def done(self, done: jax.Array) -> jax.Array:
        return done | self.hit_eos | self.hit_len

    def stop_reason(self, stop_reason: jax.Array) -> jax.Array:
        return jnp.where(self.hit_eos, STOP_EOS, jnp.where(self.hit_len, STOP_LENGTH, stop_reason))

    def seen(self, presence: jax.Array) -> jax.Array:
        """The repetition penalty's token set [B, V] with the emitted tokens added."""
        V = presence.shape[-1]
        if self.count is None:
            return presence | ((self.tokens[:, None] == jnp.arange(V)) & self.running[:, None])
        keep = jnp.arange(self.tokens.shape[1]) < self.count[:, None]
        return presence | jnp.any(jax.nn.one_hot(self.tokens, V, dtype=bool) & keep[..., None], axis=1)


def emit(
    logits: jax.Array,
    tokens: jax.Array,
    *,
    done: jax.Array,
    emitted: jax.Array,
    max_steps: jax.Array,
    eos: jax.Array | None,
    pad_id,
    proposed: jax.Array | None = None,
) -> Emitted:
    """The bookkeeping of one step, shared by every loop.

    logits: the raw model logits the tokens were drawn from, [B, V] (one token per row) or [B, K, V];
    tokens: [B] drawn (or forced), or [B, K] a block of which each row proposes its first ``proposed``
    [B]; done [B]: rows that ended before this step emit nothing (``pad_id``, log-prob 0); emitted
    ([] or [B]): tokens each row emitted before this step; max_steps ([] or [B]): its budget; eos: EOS
    ids, [E] for every row or [B, E] per row, -1 entries never match (None: no EOS). A block is cut
    after its first EOS and at the budget.
    """
    if tokens.ndim == 1:  # one token per row (the block rule with K = 1, written out: a lean step)
        token = jnp.where(done, pad_id, tokens).astype(jnp.int32)  # [B]
        logp = jax.nn.log_softmax(logits, axis=-1)
        logprob = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        logprob = jnp.where(done, 0.0, logprob)  # [B]
        running = ~done
        if eos is None:
            hit_eos = jnp.zeros_like(running)
        else:
            eos = jnp.asarray(eos, jnp.int32)
            hit_eos = running & jnp.any(token[:, None] == (eos if eos.ndim == 2 else eos[None, :]), axis=-1)
        hit_len = running & ~hit_eos & (emitted + 1 >= max_steps)
        return Emitted(tokens=token, logprobs=logprob, logp=logp, running=running, hit_eos=hit_eos, hit_len=hit_len)

    K = tokens.shape[1]
    col = jnp.arange(K)
    eos = jnp.full((1,), -1, jnp.int32) if eos is None else jnp.asarray(eos, jnp.int32)
    is_eos = jnp.any(tokens[..., None] == (eos[:, None, :] if eos.ndim == 2 else eos), axis=-1) & (
        col < proposed[:, None]
    )
    first_eos = jnp.argmax(is_eos, axis=1)
    any_eos = jnp.any(is_eos, axis=1)
    count = jnp.where(any_eos, first_eos + 1, proposed)
    running = ~done
    count = jnp.where(running, jnp.minimum(count, max_steps - emitted), 0)  # [B]
    hit_eos = running & any_eos & (first_eos < count)
    hit_len = running & ~hit_eos & (emitted + count >= max_steps)
    keep = col < count[:, None]  # [B, K]
    out_tokens = jnp.where(keep, tokens, pad_id).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    logprob = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    out_logprobs = jnp.where(keep, logprob, 0.0).astype(jnp.float32)
    return Emitted(
        tokens=out_tokens,
        logprobs=out_logprobs,
        logp=logp,
        running=running,
        hit_eos=hit_eos,
        hit_len=hit_len,
        count=count,
    )


def prefill(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run the whole prompt in one parallel forward pass, filling the cache.

    tokens [B, P] int, LEFT-padded; positions [B, P] int, 0.. at each row's first real token and
    -1 on padding; cache: empty, with ``cache.index`` where the prompt goes. Returns the logits at
    the last slot [B, V] float32 (every row's last prompt token, thanks to left padding) and the
    filled cache. The vocabulary projection runs only on that slot.
    """
    h, cache = model.hidden(tokens, positions, cache)  # [B, P, D]
    return model.logits(h[:, -1:])[:, 0], cache  # [B, V]


def prompt_presence(tokens: jax.Array, real: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: the tokens of each row's prompt (``tokens`` [B, P] where ``real`` [B, P]), one scatter
    (no [B, P, V] intermediate): what the repetition penalty sees before the first step."""
    B = tokens.shape[0]
    return jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], tokens].max(real)


def init_state(
    logits: jax.Array,
    cache: KVCache,
    prompt_tokens: jax.Array,
    prompt_positions: jax.Array,
    *,
    num_slots: int,
    rng: jax.Array,
    max_steps: int | jax.Array | None = None,
    pad_id: int | jax.Array = 0,
) -> DecodeState:
    """The loop's starting state after ``prefill``.

    logits [B, V] from prefill; prompt_tokens/prompt_positions [B, P] as given to prefill (they
    seed the repetition-penalty presence, padding excluded); num_slots N (static) sizes the
    output buffers, which start filled with ``pad_id``; max_steps (default N) is when running
    rows stop with 'length'.
    """
    B, V = logits.shape
    return DecodeState(
        cache=cache,
        logits=logits.astype(jnp.float32),
        positions=(jnp.max(prompt_positions, axis=1) + 1).astype(jnp.int32),
        rng=rng,
        step=jnp.zeros((), jnp.int32),
        max_steps=jnp.asarray(num_slots if max_steps is None else max_steps, jnp.int32),
        done=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        tokens=jnp.full((B, num_slots), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, num_slots), jnp.float32),
        stop_reason=jnp.full((B,), RUNNING, jnp.int32),
        presence=prompt_presence(prompt_tokens, prompt_positions >= 0, V),
    )


def decode_step(
    model: Transformer,
    state: DecodeState,
    sampling: SamplingParams,
    eos_ids: jax.Array | None = None,
    *,
    pad_id: int | jax.Array = 0,
    forced_tokens: jax.Array | None = None,
) -> DecodeState:
    """Emit one token per row and run the model on it. Pure: fits ``lax.while_loop`` and ``lax.scan``.

    1. draw the next token [B] from ``state.logits`` (``sample``: penalty, temperature, filters),
       or take ``forced_tokens`` [B] when given (teacher forcing, e.g. scheduled sampling);
    2. ``emit``: record it and its log-probability under ``log_softmax(state.logits)`` (differentiable
       with respect to the model parameters), mark rows that emitted one of ``eos_ids`` [E]
       (-1 entries are ignored) or reached ``state.max_steps``; finished rows emit ``pad_id``;
    3. feed it to the model at each row's next position, one cache slot, giving the next logits.
    """
    rng, key = jax.random.split(state.rng)
    token = sample(key, state.logits, sampling, state.presence) if forced_tokens is None else forced_tokens
    em = emit(
        state.logits,
        token,
        done=state.done,
        emitted=state.step,
        max_steps=state.max_steps,
        eos=None if eos_ids is None else jnp.asarray(eos_ids, jnp.int32).reshape(-1),
        pad_id=pad_id,
    )
    col = (0, state.step)
    logits, cache = model(em.tokens[:, None], state.positions[:, None], state.cache)  # [B, 1, V]
    return DecodeState(
        cache=cache,
        logits=logits[:, 0],
        positions=state.positions + 1,
        rng=rng,
        step=state.step + 1,
        max_steps=state.max_steps,
        done=em.done(state.done),
        lengths=state.lengths + em.new,
        tokens=jax.lax.dynamic_update_slice(state.tokens, em.tokens[:, None], col),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, em.logprobs[:, None].astype(jnp.float32), col),
        stop_reason=em.stop_reason(state.stop_reason),
        presence=em.seen(state.presence),
    )
