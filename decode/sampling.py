"""The per-request sampling fields (one spec every entry point derives from), per-row sampling settings as
traced arrays, and the logit filters that match Hugging Face's warpers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arjax.model.config import Bounds

# The order Hugging Face `generate` applies them in (GenerationMixin._get_logits_processor):
# repetition penalty on the raw logits (a processor, so greedy decoding sees it too), then the
# sampling warpers temperature -> top-k -> top-p -> min-p.


class FieldError(ValueError):
    """A request field with a value outside what it allows. ``field`` names it (the Python name; the
    HTTP server reports OpenAI's where it differs); the message is one line naming the value and the
    allowed range. The CLI prints it as it prints any ValueError; the server answers 400 with ``param``."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingField:
    """One per-request sampling value: its type, range, default (the value that turns it off), the note a
    refusal ends with, the CLI flag's help, and OpenAI's name for it where that differs."""

    name: str
    kind: type  # int or float; int32 / float32 on the device
    default: int | float
    bounds: Bounds
    note: str  # what the neutral value does, shown in a refusal: "0 means greedy"
    help: str
    metavar: str
    http_name: str | None = None  # None: the HTTP field has the same name
    vocab_bound: bool = False  # at most the vocabulary size (checked where the model is known)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def http(self) -> str:
        return self.http_name or self.name

    @property
    def dtype(self) -> type:
        return np.int32 if self.kind is int else np.float32

    def describe(self) -> str:
        """The allowed range in words: ``in (0, 1]``, ``>= 0``, ``a finite number > 0``."""
        text = self.bounds.describe()
        return f"a finite number {text}" if self.kind is float and self.bounds.hi is None else text


# THE list. SamplingParams, the engine's Request (through SamplingValues), the CLI's flags, a batch job's
# line keys and the HTTP request body are all derived from it. A new filter adds its field here, its
# array to SamplingParams, and its math to filter_logits.
SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField(
        name="temperature",
        kind=float,
        default=1.0,
        bounds=Bounds(0),
        note="0 means greedy",
        help="sampling temperature; 0 means greedy",
        metavar="T",
    ),
    SamplingField(
        name="top_k",
        kind=int,
        default=0,
        bounds=Bounds(0),
        note="0 turns top-k off",
        help="sample only among the k most likely tokens; 0 turns it off",
        metavar="K",
        vocab_bound=True,
    ),
    SamplingField(
        name="top_p",
        kind=float,
        default=1.0,
        bounds=Bounds(0, 1, lo_open=True),
        note="1 turns top-p off",
        help="nucleus sampling mass; 1 turns it off",
        metavar="P",
    ),
    SamplingField(
        name="min_p",
        kind=float,
        default=0.0,
        bounds=Bounds(0, 1),
        note="0 turns min-p off",
        help="drop tokens below min_p times the top probability; 0 turns it off",
        metavar="P",
    ),
    SamplingField(
        name="repetition_penalty",
        kind=float,
        default=1.0,
        bounds=Bounds(0, lo_open=True),
        note="1 turns it off; > 1 discourages repeats",
        help="penalise tokens already seen; 1 turns it off",
        metavar="R",
    ),
)
SAMPLING_NAMES: tuple[str, ...] = tuple(f.name for f in SAMPLING_FIELDS)
_BY_NAME = {f.name: f for f in SAMPLING_FIELDS}

# One request's sampling values as plain Python numbers, with the spec's defaults: the engine's Request
# inherits its sampling fields from it.
SamplingValues = dataclasses.make_dataclass(
    "SamplingValues",
    [(f.name, f.kind, dataclasses.field(default=f.default)) for f in SAMPLING_FIELDS],
    frozen=True,
    kw_only=True,
)
SamplingValues.__module__ = __name__
SamplingValues.__doc__ = "One request's sampling values (SAMPLING_FIELDS, with their defaults); unchecked."


def check_sampling_field(
    name: str, value: Any, *, vocab_size: int | None = None, row: int | None = None
) -> int | float:
    """``value`` for the sampling field ``name``, as the field's Python type, or a one-line FieldError.

    The one check of a sampling value, whoever passes it (Python, a CLI flag, a batch line, an HTTP
    body): a real number (not a bool), finite, whole for an int field, within the 32 bits the device
    holds, inside the field's bounds and, given ``vocab_size``, within the vocabulary. ``row`` (a
    batch's row) is named in range errors.
    """
    f = _BY_NAME.get(name)
    if f is None:
        raise TypeError(f"{name!r} is not a sampling field; the fields are {', '.join(SAMPLING_NAMES)}")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, f"{name}={value!r} must be a number")
    if isinstance(value, float) and not np.isfinite(value):
        raise FieldError(name, f"{name}={value!r} must be a finite number")
    if f.kind is int and value != int(value):
        raise FieldError(name, f"{name}={value!r} must be a whole number")
    limit = int(np.iinfo(np.int32).max) if f.kind is int else float(np.finfo(np.float32).max)
    if abs(value) > limit:  # 4294967301 would wrap to 5 as an int32, 1e39 become inf as a float32
        raise FieldError(
            name, f"{name}={value!r} does not fit a {np.dtype(f.dtype).name}; use a value of magnitude <= {limit:,}"
        )
    value = f.kind(value)
    where = "" if row is None else f" (row {row})"
    if value not in f.bounds:
        raise FieldError(name, f"{name}={value!r}{where} must be {f.describe()} ({f.note})")
    if f.vocab_bound and vocab_size is not None and value > vocab_size:
        raise FieldError(
            name,
            f"{name}={value!r}{where} exceeds the vocabulary size {vocab_size}; use "
            f"0 < {name} <= {vocab_size} or 0 for off",
        )
    return value


def check_sampling(values: Mapping[str, Any], *, vocab_size: int | None = None) -> dict[str, int | float]:
    """Every sampling field, checked (``check_sampling_field``): the given ``values``, the defaults for the rest."""
    unknown = sorted(set(values) - set(SAMPLING_NAMES))
    if unknown:
        raise TypeError(f"unknown sampling fields {unknown}; the fields are {', '.join(SAMPLING_NAMES)}")
    return {
        f.name: check_sampling_field(f.name, values.get(f.name, f.default), vocab_size=vocab_size)
        for f in SAMPLING_FIELDS
    }


def sampling_values(source: Any) -> dict[str, Any]:
    """The sampling fields of ``source`` (a Request, SamplingValues, argparse namespace: anything that has
    them as attributes), unchecked."""
    return {name: getattr(source, name) for name in SAMPLING_NAMES}


def request_sampling(*, vocab_size: int | None = None, **fields) -> SamplingParams:
    """One request's SamplingParams (a batch of one), each field checked by ``check_sampling_field`` (a
    FieldError names it); the fields left out take their defaults. The serving engine's check calls it:
    ``request_sampling(vocab_size=V, **sampling_values(request))``."""
    return SamplingParams.make(1, vocab_size=vocab_size, **check_sampling(fields, vocab_size=vocab_size))


@struct.dataclass
class SamplingParams:
    """Sampling settings, one value per batch row, all traced: new values never recompile.

    temperature [B] float32: 0 means greedy (argmax of the penalised logits).
    top_k [B] int32: keep the k largest logits (ties with the k-th are kept); 0 turns it off.
    top_p [B] float32: keep the nucleus of probability mass top_p; 1 turns it off.
    min_p [B] float32: drop tokens with probability < min_p * p(top token); 0 turns it off.
    repetition_penalty [B] float32: divide positive / multiply negative logits of tokens already
        seen (prompt and generated); 1 turns it off.

    The fields are SAMPLING_FIELDS, in its order (a test holds them equal). Build it with
    ``SamplingParams.make`` (validates) or ``SamplingParams.greedy``.
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
    def make(cls, batch: int, *, vocab_size: int | None = None, **values) -> SamplingParams:
        """``values``: any of SAMPLING_FIELDS (the rest take their defaults), each one value for every row
        or a sequence of ``batch`` values.

        Raises FieldError (a ValueError) naming the bad value and the allowed range. ``vocab_size``
        (optional here; ``generate`` checks it against the model) bounds top_k.
        """
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch={batch!r} must be a positive int (the number of prompts)")
        unknown = sorted(set(values) - set(SAMPLING_NAMES))
        if unknown:
            raise TypeError(
                f"SamplingParams.make got unknown sampling fields {unknown}; the fields are {', '.join(SAMPLING_NAMES)}"
            )
        params = cls(**{f.name: _per_row(f, values.get(f.name, f.default), batch, vocab_size) for f in SAMPLING_FIELDS})
        return jax.tree.map(jnp.asarray, params)

    @classmethod
    def greedy(cls, batch: int) -> SamplingParams:
        """Argmax decoding for every row, no penalty."""
        return cls.make(batch, temperature=0.0)

    def validate(self, *, batch: int | None = None, vocab_size: int | None = None) -> None:
        """Check concrete values at the API edge (before anything is traced)."""
        for f in SAMPLING_FIELDS:
            a = np.asarray(getattr(self, f.name))
            if a.ndim != 1 or (batch is not None and a.shape[0] != batch):
                raise ValueError(
                    f"SamplingParams.{f.name} has shape {a.shape}, expected ({batch if batch is not None else 'B'},): "
                    "one value per prompt; build it with SamplingParams.make(batch, ...)"
                )
            for row, value in enumerate(a.tolist()):
                check_sampling_field(f.name, value, vocab_size=vocab_size, row=row)


def _per_row(f: SamplingField, value, batch: int, vocab_size: int | None) -> np.ndarray:
    """One checked value per row (``check_sampling_field``, before the cast to the device's type)."""
    values = list(value) if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) else [value]
    if len(values) not in (1, batch):
        raise FieldError(
            f.name, f"{f.name} has {len(values)} values for {batch} prompts; pass one value or one per prompt"
        )
    checked = [check_sampling_field(f.name, v, vocab_size=vocab_size, row=row) for row, v in enumerate(values)]
    return np.asarray(checked * (batch // len(checked)), f.dtype)


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
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:
            # One key per row: row i draws as a batch of one with keys[i] would.
            draw_row = jax.vmap(lambda k, f: jax.random.categorical(k, f[None], axis=-1)[0])
            return draw_row(key, filtered).astype(jnp.int32)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy_tokens, None)
    return jnp.where(params.temperature > 0, drawn, greedy_tokens)
