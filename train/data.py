"""Training data: a corpus tokenized and split, batch sources pure in (seed, step), batches placed on devices."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from arjax.model import sharding
from arjax.model.rng import numpy_rng

# The default corpus needs nothing downloaded: CPython ships the prose of its own language
# reference and library docs (the text `help("if")` prints) as `pydoc_data.topics`, 79 topics,
# about 465 k characters (466 kB UTF-8) of English with code snippets in Python 3.11.
DEFAULT_CORPUS = "pydoc"


def default_corpus_text() -> str:
    """The Python documentation topics bundled with CPython (pydoc_data.topics), joined in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError(
            "this Python has no pydoc_data module (some minimal builds strip it); pass --data FILE instead"
        ) from None
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def read_text(path: str | None, errors: str = "strict") -> str:
    """The training text: ``path`` (UTF-8), or the default corpus when path is None or "pydoc".

    ``errors="strict"`` refuses bytes that are not UTF-8 (a binary or Latin-1 file would otherwise
    train on replacement characters), naming the byte offset; ``"replace"`` reads them as U+FFFD.
    """
    if path is None or path == DEFAULT_CORPUS:
        return default_corpus_text()
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors={errors!r}; choose 'strict' or 'replace'")
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a directory; pass --data with a UTF-8 text file")
    if not os.path.isfile(path):
        raise ValueError(
            f"data file {path!r} does not exist; pass --data with a UTF-8 text file or a directory from "
            "`arjax data prepare` (or omit it for the default corpus)"
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data file {path!r} is not UTF-8 text: byte {e.start} is 0x{raw[e.start]:02x} ({e.reason}); convert it "
            "to UTF-8, or set data_errors: replace to read such bytes as U+FFFD"
        ) from None
    if not text:
        raise ValueError(f"data file {path!r} is empty")
    return text


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray  # [N_train] int32 token ids
    val: np.ndarray  # [N_val]


def tokenize_and_split(text: str, tokenizer, *, val_fraction: float = 0.1) -> Split:
    """Tokenize once; the last ``val_fraction`` of the tokens is validation (deterministic, like nanoGPT)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
    n_val = max(1, int(len(ids) * val_fraction))
    return Split(train=ids[:-n_val], val=ids[-n_val:])


def check_length(ids: np.ndarray, seq_len: int, what: str) -> None:
    if len(ids) < seq_len + 2:
        raise ValueError(
            f"the {what} split has {len(ids)} tokens, fewer than seq_len+2={seq_len + 2}; "
            "use a longer text or a shorter seq_len"
        )


def batch_offsets(n_tokens: int, *, batch_size: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """Window starts [batch_size] for optimizer step ``step``: a pure function of (seed, step).

    A resumed run asks for the same step numbers and so sees exactly the same batches; no
    sampler state needs restoring.
    """
    rng = numpy_rng(seed, step)  # SeedSequence over both: independent streams per step
    return rng.integers(0, n_tokens - seq_len - 1, size=batch_size, endpoint=True)


def get_batch(ids: np.ndarray, *, batch_size: int, seq_len: int, seed: int, step: int, rows=None) -> np.ndarray:
    """Training windows [batch_size, seq_len + 1]: inputs are [:, :-1], targets [:, 1:].

    ``rows`` (indices into the global batch): only those windows are read, e.g. the rows one host
    feeds to its devices; the others' starts are drawn (cheap) but their tokens never touched.
    """
    starts = batch_offsets(len(ids), batch_size=batch_size, seq_len=seq_len, seed=seed, step=step)
    if rows is not None:
        starts = starts[rows]
    return np.stack([np.asarray(ids[s : s + seq_len + 1], np.int32) for s in starts])  # [B, T+1]


def eval_windows(ids: np.ndarray, *, n_windows: int, seq_len: int) -> np.ndarray:
    """A fixed set of validation windows [n_windows, seq_len + 1], evenly spaced over the split.

    Fixed (not random) so val loss is comparable across evaluations and runs.
    """
    check_length(ids, seq_len, "validation")
    last = len(ids) - seq_len - 1
    starts = np.linspace(0, last, num=n_windows).astype(np.int64)
    return np.stack([ids[s : s + seq_len + 1] for s in starts])


@dataclasses.dataclass(frozen=True)
class Windows:
    """Training batches as random windows of one token stream (nanoGPT's sampler over a corpus)."""

    ids: np.ndarray  # [N] int32
    seq_len: int

    def __post_init__(self):
        check_length(self.ids, self.seq_len, "training")

    def batch(self, *, batch_size: int, seed: int, step: int, rows=None) -> np.ndarray:
        """[batch_size, seq_len + 1] int32 (or the given ``rows`` of it): a pure function of (seed, step)."""
        return get_batch(self.ids, batch_size=batch_size, seq_len=self.seq_len, seed=seed, step=step, rows=rows)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Training batches as random rows of a fixed set of sequences [N, L+1] (e.g. samples of an oracle)."""

    rows: np.ndarray  # [N, L+1] int32

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1] - 1

    def batch(self, *, batch_size: int, seed: int, step: int, rows=None) -> np.ndarray:
        """[batch_size, L + 1] int32 rows drawn with replacement (or the given ``rows`` of that
        batch): a pure function of (seed, step)."""
        idx = numpy_rng(seed, step).integers(0, len(self.rows), size=batch_size)
        return self.rows[idx if rows is None else idx[rows]]


# ----------------------------------------------------------------------------- placement on the devices


def batch_feeder(source, plan: sharding.Plan, *, accum_steps: int, batch_size: int, seed: int):
    """``feed(step) -> [A, B, T+1]`` global array of step ``step``'s batch, split over the data axes.

    The global batch is ``source.batch(batch_size=A*B, seed=seed, step=step)`` (row a*B + b is
    micro-batch a's row b): a pure function of (seed, step), whatever the mesh or host count. Each
    process reads only the rows its own devices hold (``rows=``) and JAX assembles the global array
    from every process's part, so a run resumed on other hosts sees the same batches.
    """
    A, B, T = accum_steps, batch_size, source.seq_len
    batch_sharding = plan.batch_sharding(3, 1)
    shape = (A, B, T + 1)
    mine = sharding.host_rows(batch_sharding, shape, axis=1)
    rows = (np.arange(A)[:, None] * B + mine[None, :]).reshape(-1)

    def feed(step: int) -> jax.Array:
        windows = source.batch(batch_size=A * B, seed=seed, step=step, rows=rows)
        return sharding.global_array(batch_sharding, shape, np.asarray(windows, np.int32).reshape(A, len(mine), T + 1))

    return feed


def place_eval_windows(windows: np.ndarray, plan: sharding.Plan) -> jax.Array:
    """Validation windows [E, B, T+1] as a global array: rows split over the data axes like a
    training batch, or whole on every device when B does not split (e.g. a study's test set)."""
    where = plan.batch_sharding(3, 1)
    if windows.shape[1] % plan.data_size:
        where = plan.replicated
    rows = sharding.host_rows(where, windows.shape, axis=1)
    return sharding.global_array(where, windows.shape, np.asarray(windows[:, rows], np.int32))
