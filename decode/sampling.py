"""Per-row sampling settings as traced arrays, and the logit filters that match Hugging Face's warpers."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# The order Hugging Face `generate` applies them in (GenerationMixin._get_logits_processor):
# repetition penalty on the raw logits (a processor, so greedy decoding sees it too), then the
# sampling warpers temperature -> top-k -> top-p -> min-p.


@struct.dataclass
class SamplingParams:
    """Sampling settings, one value per batch row, all traced: new values never recompile.

    temperature [B] float32: 0 means greedy (argmax of the penalised logits).
    top_k [B] int32: keep the k largest logits (ties with the k-th are kept); 0 turns it off.
    top_p [B] float32: keep the nucleus of probability mass top_p; 1 turns it off.
    min_p [B] float32: drop tokens with probability < min_p * p(top token); 0 turns it off.
    repetition_penalty [B] float32: divide positive / multiply negative logits of tokens already
        seen (prompt and generated); 1 turns it off.

    Build it with ``SamplingParams.make`` (validates) or ``SamplingParams.greedy``.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def make(
        cls,
        batch: int,
        *,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        min_p: float | Sequence[float] = 0.0,
        repetition_penalty: float | Sequence[float] = 1.0,
        vocab_size: int | None = None,
    ) -> "SamplingParams":
        """Each setting is one value for every row or a sequence of ``batch`` values.

        Raises ValueError naming the bad value and the fix. ``vocab_size`` (optional here;
        ``generate`` checks it against the model) bounds top_k.
        """
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch={batch!r} must be a positive int (the number of prompts)")
        params = cls(
            temperature=_per_row("temperature", temperature, batch, np.float32),
            top_k=_per_row("top_k", top_k, batch, np.int32),
            top_p=_per_row("top_p", top_p, batch, np.float32),
            min_p=_per_row("min_p", min_p, batch, np.float32),
            repetition_penalty=_per_row("repetition_penalty", repetition_penalty, batch, np.float32),
        )
        params.validate(batch=batch, vocab_size=vocab_size)
        return jax.tree.map(jnp.asarray, params)

    @classmethod
    def greedy(cls, batch: int) -> "SamplingParams":
        """Argmax decoding for every row, no penalty."""
        return cls.make(batch, temperature=0.0)

    def validate(self, *, batch: int | None = None, vocab_size: int | None = None) -> None:
        """Check concrete values at the API edge (before anything is traced)."""
        arrays = {name: np.asarray(getattr(self, name)) for name in _FIELDS}
        for name, a in arrays.items():
            if a.ndim != 1 or (batch is not None and a.shape[0] != batch):
                raise ValueError(
                    f"SamplingParams.{name} has shape {a.shape}, expected ({batch if batch is not None else 'B'},): "
                    "one value per prompt; build it with SamplingParams.make(batch, ...)"
                )
        _check(arrays["temperature"], lambda t: (t >= 0) & np.isfinite(t), "temperature", "must be a finite number >= 0 (0 means greedy)")
        _check(arrays["top_k"], lambda k: k >= 0, "top_k", "must be >= 0 (0 turns top-k off)")
        if vocab_size is not None:
            _check(arrays["top_k"], lambda k: k <= vocab_size, "top_k", f"exceeds the vocabulary size {vocab_size}; use 0 < top_k <= {vocab_size} or 0 for off")
        _check(arrays["top_p"], lambda p: (p > 0) & (p <= 1), "top_p", "must be in (0, 1] (1 turns top-p off)")
        _check(arrays["min_p"], lambda p: (p >= 0) & (p <= 1), "min_p", "must be in [0, 1] (0 turns min-p off)")
        _check(arrays["repetition_penalty"], lambda r: (r > 0) & np.isfinite(r), "repetition_penalty", "must be a finite number > 0 (1 turns it off; > 1 discourages repeats)")


_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _per_row(name: str, value, batch: int, dtype) -> np.ndarray:
    """One value per row, checked before the cast: a real, finite number that fits ``dtype``
    (4294967301 would silently wrap to 5 as an int32, 1e39 become inf as a float32)."""
    values = list(value) if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) else [value]
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for {batch} prompts; pass one value or one per prompt")
    limit = int(np.iinfo(np.int32).max) if dtype == np.int32 else float(np.finfo(np.float32).max)
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name}={v!r} must be a number")
        if not np.isfinite(float(v)):
            raise ValueError(f"{name}={v!r} must be a finite number")
        if dtype == np.int32 and float(v) != int(v):
            raise ValueError(f"{name}={v!r} must be a whole number")
        if abs(v) > limit:
            raise ValueError(f"{name}={v!r} does not fit a {np.dtype(dtype).name}; use a value of magnitude <= {limit:,}")
    return np.asarray(values, dtype)


def _check(a: np.ndarray, ok, name: str, fix: str) -> None:
    bad = ~ok(a)  # NaN fails every comparison, so it is reported too
    if np.any(bad):
        row = int(np.argmax(bad))
        raise ValueError(f"{name}={a[row].item()!r} (row {row}) {fix}")


def apply_repetition_penalty(logits: jax.Array, presence: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF RepetitionPenaltyLogitsProcessor: for seen tokens, logit / p if positive else logit * p.

    logits [B, V] float32, presence [B, V] bool (token seen in prompt or output), penalty [B].
    """
    p = penalty[:, None]  # [B, 1]
    penalised = jnp.where(logits < 0, logits * p, logits / p)
    return jnp.where(presence, penalised, logits)


def filter_logits(logits: jax.Array, params: SamplingParams, presence: jax.Array | None = None) -> jax.Array:
    """The sampling distribution's logits [B, V] float32, ``-inf`` where a filter removed a token.

    logits: raw model logits [B, V]; presence: [B, V] bool, tokens seen so far (for the
    repetition penalty; None: nothing seen). Applies, per row and in Hugging Face's order:
    repetition penalty, temperature, top-k, top-p, min-p, each exactly as the matching
    ``transformers`` logits processor/warper does (min_tokens_to_keep=1). A greedy row
    (temperature 0) keeps only its argmax (the first one on ties), so sampling it is argmax.
    """
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    if presence is not None:
        logits = apply_repetition_penalty(logits, presence, params.repetition_penalty)
    greedy = params.temperature <= 0  # [B]
    x = logits / jnp.where(greedy, 1.0, params.temperature)[:, None]  # [B, V]
    x = _top_k_top_p(x, params.top_k, params.top_p)
    x = _min_p(x, params.min_p)
    argmax_only = jnp.arange(V) == jnp.argmax(logits, axis=-1)[:, None]  # [B, V]
    return jnp.where(greedy[:, None], jnp.where(argmax_only, logits, -jnp.inf), x)


def _top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p from one ascending sort of the values; skipped when no row uses either."""
    V = x.shape[-1]

    def filtered(x):
        sorted_x = jnp.sort(x, axis=-1)  # [B, V] ascending, as HF's TopPLogitsWarper sorts
        # Top-k (TopKLogitsWarper): remove everything strictly below the k-th largest value.
        k = jnp.clip(top_k, 1, V)
        kth = jnp.take_along_axis(sorted_x, (V - k)[:, None], axis=-1)  # [B, 1]
        kth = jnp.where((top_k > 0)[:, None], kth, -jnp.inf)
        x = jnp.where(x < kth, -jnp.inf, x)
        sorted_x = jnp.where(sorted_x < kth, -jnp.inf, sorted_x)  # still ascending
        # Top-p (TopPLogitsWarper): remove the tokens whose ascending cumulative probability is
        # <= 1 - top_p, never the largest; off (HF skips it) when top_p == 1. The cumulative sum
        # only grows, so the removed tokens are a prefix of the sorted order, of length `cut`.
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)  # [B, V]
        remove_sorted = (cum <= (1.0 - top_p)[:, None]) & (top_p < 1.0)[:, None]
        cut = jnp.minimum(jnp.sum(remove_sorted, axis=-1), V - 1)  # [B]
        smallest_kept = jnp.take_along_axis(sorted_x, cut[:, None], axis=-1)  # [B, 1]
        # Map the prefix back without a scatter: everything below the smallest kept value goes,
        # and of the tokens tied with it, the lowest ids go first (a stable sort's order) until
        # the prefix is full.
        below = x < smallest_kept
        tied = x == smallest_kept
        ties_removed = cut - jnp.sum(below, axis=-1)  # [B]
        remove = below | (tied & (jnp.cumsum(tied, axis=-1) <= ties_removed[:, None]))
        return jnp.where(remove, -jnp.inf, x)

    needed = jnp.any(top_k > 0) | jnp.any(top_p < 1.0)
    return jax.lax.cond(needed, filtered, lambda x: x, x)


def _min_p(x: jax.Array, min_p: jax.Array) -> jax.Array:
    """MinPLogitsWarper: remove tokens with probability < min_p * (top probability)."""
    probs = jax.nn.softmax(x, axis=-1)  # [B, V]
    top = jnp.max(probs, axis=-1, keepdims=True)  # [B, 1]
    remove = probs < min_p[:, None] * top
    # min_tokens_to_keep=1: the top token survives even for min_p > 1 (validation forbids that).
    remove = remove & (jnp.arange(x.shape[-1]) != jnp.argmax(probs, axis=-1)[:, None])
    return jnp.where(remove, -jnp.inf, x)


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams, presence: jax.Array | None = None) -> jax.Array:
    """Draw one token per row [B] int32 from ``filter_logits(logits, params, presence)``.

    Greedy rows (temperature 0) get the argmax of the penalised logits; when every row is
    greedy no filter or random draw runs at all. ``key``: one key for the batch, or one per row
    ([B] keys: each row draws what a batch of one would with its key, whatever the other rows are;
    the serving engine relies on that).
    """
    logits = logits.astype(jnp.float32)
    penalised = logits if presence is None else apply_repetition_penalty(logits, presence, params.repetition_penalty)
    greedy_tokens = jnp.argmax(penalised, axis=-1).astype(jnp.int32)  # [B]

    def draw(_):
        filtered = filter_logits(logits, params, presence)
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:  # one key per row: row i draws as a batch of one with keys[i] would
            return jax.vmap(lambda k, f: jax.random.categorical(k, f[None], axis=-1)[0])(key, filtered).astype(jnp.int32)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy_tokens, None)
    return jnp.where(params.temperature > 0, drawn, greedy_tokens)
