"""The jitted ``lax.while_loop`` decoder behind ``generate`` and ``stream``: input checks, buckets,
chunks, stop strings.

The step it loops over (with the decode state, prefill and the stop codes) lives in ``arjax.decode.step``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.decode.sampling import SamplingParams
from arjax.decode.speculative import DraftModel, PromptLookup, check_draft, spec_loop, spec_start

# DecodeState, prefill and init_state are this module's API too (imported from here by users and tests).
from arjax.decode.step import (
    STOP_NAMES,
    STOP_STRING,
    DecodeState,
    decode_step,
    init_state,
    prefill,
)
from arjax.decode.stops import StopStrings
from arjax.model import Transformer, init_cache
from arjax.model.memory import Need, check_needs, kv_cache_bytes, loaded_needs
from arjax.model.quant import check_kv_cache_dtype
from arjax.model.rng import check_seed, seed_key
from arjax.model.sharding import cache_sharding, mesh_of

# Prompt widths and output-buffer sizes are rounded up to one of these, so a new prompt length
# or max_new_tokens inside a bucket reuses the compiled program.
DEFAULT_BUCKETS = tuple(2**i for i in range(4, 21))  # 16, 32, ..., 1M
EOS_SLOTS = 8  # eos ids are padded (with -1) to a multiple of this: a new EOS set never recompiles

# Incremented when a jitted function is traced (not when it runs): tests read it to prove that
# a new prompt length in the same bucket or new sampling values do not compile again.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateOutput:
    """What ``generate`` returns, as numpy arrays.

    tokens [B, N] int32: row i's new tokens are ``tokens[i, :lengths[i]]`` (ending with the EOS
        id when it stopped on one); the rest is ``pad_id``.
    lengths [B] int32: number of tokens each row emitted, its EOS included.
    stop_reason [B] str: 'eos' (emitted one of eos_ids) or 'length' (reached max_new_tokens).
    logprobs [B, N] float32: log-probability of each emitted token under the model's own
        distribution (raw logits, temperature 1, before penalty and filters); 0 after the end.
    num_steps: decode steps the loop ran (< N when every row stopped early); with a draft, the
        target's forward passes after prefill (rounds).
    texts (with stop strings only, else None): each row's decoded text, ending before the stop string
        (``tokens`` then end with the token that completed it; ``stop_reason`` 'stop').
    acceptance_rate, tokens_per_pass (speculative decoding only, else None): drafts accepted over
        drafts proposed (rows still running), and tokens emitted per row per target pass (prefill's
        counted).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray
    logprobs: np.ndarray
    num_steps: int
    acceptance_rate: float | None = None
    tokens_per_pass: float | None = None
    texts: list[str] | None = None


def _loop(model, state: DecodeState, sampling, eos_ids, pad_id, limit) -> DecodeState:
    """Decode until every row is done or ``state.step`` reaches ``limit`` (traced)."""

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        return decode_step(model, s, sampling, eos_ids, pad_id=pad_id)

    return jax.lax.while_loop(cond, body, state)


def _start_impl(
    graphdef,
    num_slots,
    cache_len,
    cache_sharding,
    params,
    tokens,
    positions,
    rng,
    max_steps,
    sampling,
    eos_ids,
    pad_id,
    limit,
    cache_dtype=None,
):
    """Prefill + the first chunk of the loop, one program (generate's single jitted call).

    ``cache_sharding`` (static; None on one device): where the cache's keys and values live when
    the weights are sharded, rows over the batch axes and KV heads over the model axis.
    ``cache_dtype`` (static): ``init_cache``'s dtype, None (the model's), a float dtype or "int8".
    """
    TRACE_COUNTS["start"] += 1
    model = nnx.merge(graphdef, params)
    B = tokens.shape[0]
    cache = init_cache(model.cfg, B, cache_len, cache_dtype)
    if cache_sharding is not None:
        constrain = lambda kv: tuple(jax.lax.with_sharding_constraint(x, cache_sharding) for x in kv)
        cache = cache.replace(k=constrain(cache.k), v=constrain(cache.v))
    logits, cache = prefill(model, tokens, positions, cache)
    state = init_state(
        logits, cache, tokens, positions, num_slots=num_slots, rng=rng, max_steps=max_steps, pad_id=pad_id
    )
    return _loop(model, state, sampling, eos_ids, pad_id, limit)


def _resume_impl(graphdef, params, state, sampling, eos_ids, pad_id, limit):
    """One more chunk of the loop (stream); the state, cache included, is donated."""
    TRACE_COUNTS["resume"] += 1
    return _loop(nnx.merge(graphdef, params), state, sampling, eos_ids, pad_id, limit)


_start = jax.jit(_start_impl, static_argnums=(0, 1, 2, 3), static_argnames=("cache_dtype",))
_resume = jax.jit(_resume_impl, static_argnums=(0,), donate_argnums=(2,))


def _spec_start_impl(
    graphdef,
    draft_graphdef,
    num_slots,
    cache_len,
    k,
    ngram,
    params,
    draft_params,
    tokens,
    positions,
    rng,
    max_steps,
    sampling,
    eos_ids,
    pad_id,
    limit,
    cache_dtype=None,
):
    """Speculative decoding's prefill, first token and first chunk of rounds, one program."""
    TRACE_COUNTS["spec_start"] += 1
    target = nnx.merge(graphdef, params)
    draft = None if draft_graphdef is None else nnx.merge(draft_graphdef, draft_params)
    state = spec_start(
        target,
        draft,
        tokens,
        positions,
        rng,
        max_steps,
        sampling,
        eos_ids,
        pad_id,
        num_slots=num_slots,
        cache_len=cache_len,
        k=k,
        cache_dtype=cache_dtype,
    )
    return spec_loop(target, draft, state, sampling, eos_ids, pad_id, limit, k=k, ngram=ngram)


def _spec_resume_impl(
    graphdef, draft_graphdef, k, ngram, params, draft_params, state, sampling, eos_ids, pad_id, limit
):
    TRACE_COUNTS["spec_resume"] += 1
    target = nnx.merge(graphdef, params)
    draft = None if draft_graphdef is None else nnx.merge(draft_graphdef, draft_params)
    return spec_loop(target, draft, state, sampling, eos_ids, pad_id, limit, k=k, ngram=ngram)


_spec_start = jax.jit(_spec_start_impl, static_argnums=(0, 1, 2, 3, 4, 5), static_argnames=("cache_dtype",))
_spec_resume = jax.jit(_spec_resume_impl, static_argnums=(0, 1, 2, 3), donate_argnums=(6,))


def bucket(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= n (n itself when it exceeds every bucket)."""
    return next((b for b in buckets if b >= n), n)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Host-side inputs and static shapes for one generate/stream call, validated."""

    tokens: np.ndarray  # [B, P] left-padded
    positions: np.ndarray  # [B, P]
    num_slots: int  # N, output buffer width (bucketed max_new_tokens)
    cache_len: int
    max_new_tokens: int
    eos_ids: np.ndarray  # [E] int32, -1 padded
    cache_dtype: str | None = None  # kv_cache_dtype: None (the model's dtype), a float dtype name or "int8"


def check_prompt(prompt, vocab_size: int, what: str = "the prompt") -> np.ndarray:
    """A prompt (token ids) as an int32 array, or a ValueError naming ``what`` is wrong with it."""
    a, V = np.asarray(prompt), vocab_size
    if a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"{what} is {'empty' if a.size == 0 else f'shaped {a.shape}'}; "
            "every prompt needs at least one token id (e.g. the BOS id)"
        )
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} holds {a.dtype} values; token ids must be ints")
    bad = (a < 0) | (a >= V)
    if bad.any():
        raise ValueError(
            f"{what} has token id {a[bad][0]} outside [0, {V}); the model's vocabulary has {V} ids "
            "(check the tokenizer matches the model)"
        )
    return a.astype(np.int32)


def eos_array(eos_ids, vocab_size: int, width: int | None = None) -> np.ndarray:
    """EOS ids (an int, a sequence or None) checked and padded with -1 to ``width`` (default: a multiple of
    EOS_SLOTS, so a new EOS set of similar size never recompiles)."""
    eos = np.atleast_1d(np.asarray(eos_ids if eos_ids is not None else (), np.int64)).ravel()
    bad = (eos < 0) | (eos >= vocab_size)
    if bad.any():
        raise ValueError(f"eos id {eos[bad][0]} is outside [0, {vocab_size}); pass ids of the model's vocabulary")
    if width is None:
        width = EOS_SLOTS * max(1, -(-len(eos) // EOS_SLOTS))
    elif len(eos) > width:
        raise ValueError(f"{len(eos)} eos ids; at most {width} per request")
    return np.concatenate([eos, np.full(width - len(eos), -1)]).astype(np.int32)


def _plan(
    model,
    prompts,
    *,
    max_new_tokens,
    sampling,
    eos_ids,
    pad_id,
    max_len,
    buckets,
    seed=0,
    extra_slots=0,
    spec_cap=None,
    kv_cache_dtype=None,
) -> _Plan:
    """Every check of user input happens here, before anything is traced."""
    kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)  # its name, hashable: a static argument
    cfg = model.cfg
    V = cfg.vocab_size
    if hasattr(prompts, "shape") and len(prompts.shape) == 2:  # a [B, P] array of equal-length prompts
        prompts = list(np.asarray(prompts))
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError(
            f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__} {prompts!r:.60}"
        )
    check_seed(seed)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    buckets = tuple(sorted(int(b) for b in buckets))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"buckets={buckets!r} must be positive sizes, e.g. (16, 32, 64, ...)")
    if not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < V:
        raise ValueError(f"pad_id={pad_id!r} must be a token id in [0, {V})")
    rows = [check_prompt(p, V, f"prompt {i}") for i, p in enumerate(prompts)]
    longest = max(len(r) for r in rows)
    B = len(rows)

    if max_len is not None:
        if not isinstance(max_len, (int, np.integer)) or max_len < 2:
            raise ValueError(f"max_len={max_len!r} must be an int >= 2 (the cache length)")
        if cfg.pos == "learned" and max_len > cfg.max_len:
            raise ValueError(
                f"max_len={max_len} exceeds the model's max_len={cfg.max_len} (learned positions end there); "
                f"use max_len <= {cfg.max_len}"
            )
        cache_len = int(max_len)
    else:
        # Each decode step attends over the whole static cache, so size it to what this call
        # needs (bucketed), not to the model's context.
        cache_len = min(cfg.max_len, bucket(longest, buckets) + bucket(max_new_tokens, buckets))
    if longest + max_new_tokens > cache_len:
        where = "the given max_len" if max_len is not None else "the model's max_len"
        fix = (
            f"lower max_new_tokens to <= {cache_len - longest}, shorten the prompt"
            if cache_len > longest
            else f"the prompt alone fills the cache: shorten it below {cache_len} tokens"
        )
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} "
            f"exceeds the cache length {cache_len} ({where}); {fix}"
            # RoPE has no learned position table, so a longer cache than the model's max_len works
            # (quality past the trained length is another matter); learned positions end at max_len.
            + (f", or pass max_len={longest + max_new_tokens} (or more)" if cfg.pos == "rope" else "")
        )
    # Prompt width: its bucket, shrunk only when the cache cannot hold bucket + new tokens.
    P = min(bucket(longest, buckets), cache_len - max_new_tokens)
    num_slots = bucket(max_new_tokens, buckets)
    if extra_slots:
        # Speculative decoding writes a block of k+1 slots from a row's last token (rows that ended
        # too, while others run): the cache holds the prompt width + max_new_tokens + k. Capped by
        # max_len when given and by every learned-position model's context (target and draft).
        cap = min([c for c in (max_len, spec_cap) if c is not None], default=None)
        cache_len = P + num_slots + extra_slots
        if cap is not None and cache_len > cap:
            P = min(P, cap - max_new_tokens - extra_slots)  # a narrower prompt width first
            if longest > P:
                raise ValueError(
                    f"speculative decoding needs the longest prompt ({longest} tokens) + max_new_tokens "
                    f"({max_new_tokens}) + k ({extra_slots}) = {longest + max_new_tokens + extra_slots} "
                    "cache slots, over "
                    f"""{
                        "the given max_len"
                        if cap == max_len
                        else "the context of a learned-position model (target or draft)"
                    }"""
                    f" ({cap}); lower max_new_tokens or k"
                )
            cache_len = cap

    tokens = np.full((B, P), pad_id, np.int32)
    positions = np.full((B, P), -1, np.int32)
    for i, r in enumerate(rows):
        tokens[i, P - len(r) :] = r
        positions[i, P - len(r) :] = np.arange(len(r))

    eos = eos_array(eos_ids, V)

    if sampling is not None:
        if not isinstance(sampling, SamplingParams):
            raise ValueError(
                "sampling must be a SamplingParams (SamplingParams.make(batch, ...)) or None, "
                f"got {type(sampling).__name__}"
            )
        sampling.validate(batch=B, vocab_size=V)
    # The weights are in memory already; the cache and the per-row state come on top (split over a
    # tensor-parallel mesh at best evenly: a lower bound per device).
    state = nnx.state(model) if isinstance(model, nnx.Module) else {}
    mesh = mesh_of(state)
    shards = 1 if mesh is None else mesh.size
    check_needs(
        [
            *loaded_needs(state, shards=shards),
            Need(
                f"the KV cache ({B} prompts x {cache_len} slots)",
                kv_cache_bytes(cfg, B, cache_len, kv_cache_dtype) // shards,
                "lower max_len or max_new_tokens, or decode fewer prompts at once",
            ),
            Need(
                f"the decode state ({B} prompts x vocab_size={V} logits, {num_slots} output slots)",
                (B * V * 5 + B * num_slots * 8) // shards,
                "decode fewer prompts at once or lower max_new_tokens",
            ),
        ],
        None if mesh is None else list(mesh.devices.flat),
    )
    return _Plan(
        tokens=tokens,
        positions=positions,
        num_slots=num_slots,
        cache_len=cache_len,
        max_new_tokens=int(max_new_tokens),
        eos_ids=eos,
        cache_dtype=kv_cache_dtype,
    )


def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_ids: int | Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    max_len: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    chunk_steps: int | None = 16,
    draft: DraftModel | PromptLookup | None = None,
    kv_cache_dtype: str | None = None,
    stop: Sequence[str] = (),
    tokenizer=None,
    _text: bool = False,
) -> Iterator[list[np.ndarray]]:
    """Decode in chunks of ``chunk_steps`` steps, yielding each chunk's new tokens per row.

    Yields a list of B int32 arrays (empty for rows that had already ended); the generator's
    return value (``StopIteration.value``) is the full ``GenerateOutput``. The first chunk runs
    prefill and the loop in one jitted program; later chunks resume the loop with the state
    donated. ``chunk_steps=None`` runs everything in one chunk (that is ``generate``). Tokens
    are the same as generate's for the same arguments, whatever the chunking. ``stop``: strings
    that end a row when its text (``tokenizer.decode``) holds one (``arjax.decode.stops``), checked
    between chunks; a row's tokens then end with the one that completed it. With a ``draft``
    (speculative decoding, ``arjax.decode.speculative``) a chunk is ``chunk_steps`` target passes.
    """
    if chunk_steps is not None and (not isinstance(chunk_steps, (int, np.integer)) or chunk_steps < 1):
        raise ValueError(f"chunk_steps={chunk_steps!r} must be an int >= 1 (or None for one chunk)")
    if draft is not None:
        check_draft(draft, model)
    plan = _plan(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=eos_ids,
        pad_id=pad_id,
        max_len=max_len,
        buckets=buckets,
        seed=seed,
        extra_slots=0 if draft is None else int(draft.k),
        spec_cap=None if draft is None else _learned_context(model, draft),
        kv_cache_dtype=kv_cache_dtype,
    )
    # Validation above runs at call time; the decoding below runs as the caller iterates.
    stops = StopStrings(tokenizer, stop, plan.tokens.shape[0])
    return _run(model, plan, sampling, seed, pad_id, chunk_steps, draft, stops, text=_text)


def _learned_context(model, draft) -> int | None:
    """The shortest context among the learned-position models of a speculative call (None: all RoPE)."""
    models = [model] + ([draft.model] if isinstance(draft, DraftModel) else [])
    return min((m.cfg.max_len for m in models if m.cfg.pos == "learned"), default=None)


def stream_text(
    model: Transformer, prompts, *, tokenizer, chunk_steps: int | None = 8, **kwargs
) -> Iterator[list[str]]:
    """``stream``, yielding each row's new text instead of its tokens: never text after a stop string
    (a tail that could still become one is held back until it cannot), nor half a UTF-8 character.
    Takes ``stream``'s arguments; its return value is the ``GenerateOutput`` (``texts`` with stop strings)."""
    return stream(model, prompts, tokenizer=tokenizer, chunk_steps=chunk_steps, _text=True, **kwargs)


def _run(
    model,
    plan: _Plan,
    sampling,
    seed,
    pad_id,
    chunk_steps,
    draft=None,
    stops: StopStrings | None = None,
    text: bool = False,
) -> Iterator[list]:
    """The one decoding loop behind stream, stream_text and generate, plain or speculative.

    Between chunks, rows whose text holds a stop string (``stops``) are marked done on the device and
    cut at the token that completed it. Yields each row's new tokens, or (``text``) its new visible text.
    """
    B = plan.tokens.shape[0]
    sampling = SamplingParams.greedy(B) if sampling is None else sampling
    # Split on every call rather than caching the state: the weights may have changed since the
    # last call (sampling during training). It walks the module once per call, never per step.
    graphdef, params = nnx.split(model)
    chunk = plan.max_new_tokens if chunk_steps is None else int(chunk_steps)
    N = plan.max_new_tokens
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    eos, pad = jnp.asarray(plan.eos_ids), i32(pad_id)
    tokens, positions = jnp.asarray(plan.tokens), jnp.asarray(plan.positions)

    limit = min(chunk, N)
    if draft is None:
        mesh = mesh_of(params)  # tensor-parallel weights: the cache is sharded to match
        kv_sharding = None if mesh is None else cache_sharding(mesh, B, model.cfg.num_kv_heads)
        state = _start(
            graphdef,
            plan.num_slots,
            plan.cache_len,
            kv_sharding,
            params,
            tokens,
            positions,
            seed_key(seed),
            i32(N),
            sampling,
            eos,
            pad,
            i32(limit),
            cache_dtype=plan.cache_dtype,
        )
        resume = lambda state, limit: _resume(graphdef, params, state, sampling, eos, pad, i32(limit))
        steps_of = lambda state: state.step
    else:
        draft_graphdef, draft_params = nnx.split(draft.model) if isinstance(draft, DraftModel) else (None, None)
        k, ngram = int(draft.k), int(getattr(draft, "ngram", 0))
        state = _spec_start(
            graphdef,
            draft_graphdef,
            plan.num_slots,
            plan.cache_len,
            k,
            ngram,
            params,
            draft_params,
            tokens,
            positions,
            seed_key(seed),
            i32(N),
            sampling,
            eos,
            pad,
            i32(limit),
            cache_dtype=plan.cache_dtype,
        )
        resume = lambda state, limit: _spec_resume(
            graphdef,
            draft_graphdef,
            k,
            ngram,
            params,
            draft_params,
            state,
            sampling,
            eos,
            pad,
            i32(limit),
        )
        steps_of = lambda state: state.rounds
    emitted = np.zeros(B, np.int64)
    stops = stops or StopStrings(None, (), B)
    cut = np.full(B, np.iinfo(np.int64).max)  # tokens kept by rows that hit a stop string
    while True:
        out, lengths, done, step = jax.device_get((state.tokens, state.lengths, state.done, steps_of(state)))
        # Every row, finished ones too: a stop string may precede an EOS or the length limit in this chunk.
        hit = np.array([stops.check(i, out[i, : lengths[i]]) for i in range(B)], bool)
        if stops.stops:
            cut = np.array([r.cut if r.cut is not None else cut[i] for i, r in enumerate(stops.rows)])
            lengths = np.minimum(lengths, cut)
        if text:
            yield [stops.delta(i, out[i, : lengths[i]], final=bool(done[i] or hit[i])) for i in range(B)]
        else:
            yield [out[i, emitted[i] : lengths[i]] for i in range(B)]
        emitted = lengths.astype(np.int64)
        if (done | hit).all() or step >= N:
            break
        if hit.any():  # those rows stop costing steps
            state = state.replace(done=state.done | jnp.asarray(hit))
        limit = min(int(step) + chunk, N)
        state = resume(state, limit)
    out, lengths, logprobs, reason, step = jax.device_get(
        (state.tokens, state.lengths, state.logprobs, state.stop_reason, steps_of(state))
    )
    stopped = cut < np.iinfo(np.int64).max
    if stopped.any():  # cut at the token that completed the stop string
        lengths = np.where(stopped, np.minimum(lengths, cut), lengths).astype(np.int32)
        cols = np.arange(out.shape[1])[None, :] >= lengths[:, None]
        out, logprobs = np.where(cols, pad_id, out), np.where(cols, 0.0, logprobs)
        reason = np.where(stopped, STOP_STRING, reason)
    stats = {}
    if draft is not None:
        drafted, accepted = jax.device_get((state.drafted, state.accepted))
        stats = {
            "acceptance_rate": float(accepted.sum() / max(drafted.sum(), 1)),
            "tokens_per_pass": float(lengths.sum() / max(B * (int(step) + 1), 1)),
        }
    texts = [stops.visible(i, out[i, : lengths[i]], final=True) for i in range(B)] if stops.stops else None
    return GenerateOutput(
        tokens=np.asarray(out[:, :N]),
        lengths=np.asarray(lengths),
        stop_reason=np.array([STOP_NAMES[int(r)] for r in reason]),
        logprobs=np.asarray(logprobs[:, :N]),
        num_steps=int(step),
        texts=texts,
        **stats,
    )


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_ids: int | Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    max_len: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    draft: DraftModel | PromptLookup | None = None,
    kv_cache_dtype: str | None = None,
    stop: Sequence[str] = (),
    tokenizer=None,
) -> GenerateOutput:
    """Continue each prompt (a list of token ids; lengths may differ) by up to ``max_new_tokens``.

    sampling: per-row ``SamplingParams`` (None: greedy). eos_ids: a row stops after emitting any
    of them. seed: the same seed gives the same tokens. pad_id fills each row after its end.
    max_len: cache length (default: bucketed longest prompt + bucketed max_new_tokens, capped at
    the model's max_len). Prompt widths and max_new_tokens are rounded up to ``buckets`` so that
    new lengths inside a bucket, new sampling values, seeds and EOS ids reuse the compiled
    program. One jitted call: prefill + ``lax.while_loop``, which exits when every row is done.
    kv_cache_dtype: None (the model's dtype), a float dtype, or "int8" (int8 keys and values with
    a scale per token and KV head, ``arjax.model.quant``); int8 weights: ``arjax.model.quantize``.
    draft: speculative decoding (``arjax.decode.speculative``: ``DraftModel`` or ``PromptLookup``).
    stop: strings that end a row (with ``tokenizer``): ``texts`` then holds each row's text up to
    one; the loop runs in chunks of 16 steps so that such rows stop early.
    """
    it = stream(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=eos_ids,
        seed=seed,
        pad_id=pad_id,
        max_len=max_len,
        buckets=buckets,
        chunk_steps=16 if stop else None,
        draft=draft,
        kv_cache_dtype=kv_cache_dtype,
        stop=stop,
        tokenizer=tokenizer,
    )
    while True:
        try:
            next(it)
        except StopIteration as stop_iteration:
            return stop_iteration.value
