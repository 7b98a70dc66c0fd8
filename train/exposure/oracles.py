"""Oracle language models with exact next-token conditionals: a random transformer, an HMM, a Dyck grammar.

Every oracle shares one interface (what the exposure-bias metrics in ``arjax.train.exposure.metrics`` need):

- ``vocab_size``, ``bos_id``: sequences are ``[BOS, x_1, ..., x_L]``; BOS is column 0.
- ``log_probs(tokens [B, T]) -> [B, T, V]`` float32: row ``t`` is ``log o(. | tokens[:, :t+1])``,
  the exact next-token distribution after every prefix (the same layout as model logits).
- ``sample(key, batch, length) -> [B, length + 1]`` int32: BOS followed by ``length`` sampled tokens.

Sampling and scoring share one description of each source (``_init``/``_dist``/``_update`` for the
state-machine oracles), so a sample is by construction a draw from the distribution being scored.
``make_dataset`` draws deterministic train/test sets by seed.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.decode import SamplingParams, generate
from arjax.model import Transformer
from arjax.model.rng import numpy_rng, seed_key


class Oracle(Protocol):
    vocab_size: int
    bos_id: int

    def log_probs(self, tokens: jax.Array) -> jax.Array: ...

    def sample(self, key: jax.Array, batch: int, length: int) -> jax.Array: ...


def _check_tokens(tokens, vocab_size: int, bos_id: int) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids span [{lo}, {hi}] but the oracle's vocabulary is [0, {vocab_size}); remap the ids")
    return tokens.astype(jnp.int32)


def _check_sample_args(batch: int, length: int) -> None:
    if batch <= 0 or length <= 0:
        raise ValueError(f"sample needs batch > 0 and length > 0, got batch={batch}, length={length}")


class _StateMachineOracle:
    """An oracle given by a hidden state: ``_init(B)``, ``_dist(state) -> [B, V] log-probs``,
    ``_update(state, token [B]) -> state``. ``log_probs`` and ``sample`` are both scans over it."""

    vocab_size: int
    bos_id: int

    def __init__(self):
        self._log_probs = jax.jit(self._log_probs_impl)
        self._sample = jax.jit(self._sample_impl, static_argnums=(1, 2))

    def _log_probs_impl(self, tokens):  # [B, T] -> [B, T, V]
        state = self._init(tokens.shape[0])
        # Column 0 is BOS: the first distribution is the source's initial one.
        first = self._dist(state)

        def step(state, tok):  # tok [B]
            state = self._update(state, tok)
            return state, self._dist(state)

        _, rest = jax.lax.scan(step, state, tokens[:, 1:].T)  # [T-1, B, V]
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

    def _sample_impl(self, key, batch, length):
        def step(state, key):
            tok = jax.random.categorical(key, self._dist(state)).astype(jnp.int32)  # [B]
            return self._update(state, tok), tok

        _, toks = jax.lax.scan(step, self._init(batch), jax.random.split(key, length))  # [L, B]
        bos = jnp.full((batch, 1), self.bos_id, jnp.int32)
        return jnp.concatenate([bos, toks.T], axis=1)

    def log_probs(self, tokens) -> jax.Array:
        """[B, T] token ids (column 0 = BOS) -> [B, T, V] exact next-token log-probabilities."""
        return self._log_probs(_check_tokens(tokens, self.vocab_size, self.bos_id))

    def sample(self, key, batch: int, length: int) -> jax.Array:
        """BOS followed by ``length`` tokens drawn from the source: [batch, length + 1] int32."""
        _check_sample_args(batch, length)
        return self._sample(key, int(batch), int(length))


class HMMOracle(_StateMachineOracle):
    """A hidden Markov model with Dirichlet-random parameters; exact conditionals by forward filtering.

    Small ``concentration`` makes transitions and emissions peaky (low entropy, long memory through
    the hidden state); BOS (id 0) is an ordinary emitted token, so every conditional is positive.
    """

    def __init__(self, *, vocab_size: int, n_states: int, seed: int = 0, concentration: float = 0.3):
        if vocab_size < 2 or n_states < 1:
            raise ValueError(f"HMMOracle needs vocab_size >= 2 and n_states >= 1, got {vocab_size}, {n_states}")
        if concentration <= 0:
            raise ValueError(f"concentration={concentration} must be positive (Dirichlet parameter)")
        self.vocab_size, self.bos_id, self.n_states = vocab_size, 0, n_states
        # numpy draws the parameters: jax's Dirichlet compiles a gamma sampler, seconds for a few numbers.
        rng = numpy_rng(seed)

        def dirichlet(rows, size):
            p = rng.dirichlet(np.full(size, concentration), size=rows) + 1e-6  # floor: no exact zeros
            return jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32)

        self.init_probs = dirichlet(1, n_states)[0]  # [S]
        self.trans = dirichlet(n_states, n_states)  # [S, S], row = from
        self.emit = dirichlet(n_states, vocab_size)  # [S, V]
        super().__init__()

    # State: the predictive distribution of the hidden state that emits the next token, [B, S].
    def _init(self, batch):
        return jnp.broadcast_to(self.init_probs, (batch, self.n_states))

    def _dist(self, belief):
        return jnp.log(belief @ self.emit)  # [B, V]

    def _update(self, belief, tok):
        post = belief * self.emit[:, tok].T  # [B, S]: condition on the emitted token
        post = post / post.sum(-1, keepdims=True)
        return post @ self.trans  # predict the next hidden state

    def _sample_impl(self, key, batch, length):
        # Ancestral sampling through the hidden chain (cheaper than filtering, same distribution).
        def step(s, key):
            ke, kt = jax.random.split(key)
            tok = jax.random.categorical(ke, jnp.log(self.emit[s])).astype(jnp.int32)
            return jax.random.categorical(kt, jnp.log(self.trans[s])), tok

        k0, k1 = jax.random.split(key)
        s0 = jax.random.categorical(k0, jnp.log(self.init_probs), shape=(batch,))
        _, toks = jax.lax.scan(step, s0, jax.random.split(k1, length))
        return jnp.concatenate([jnp.full((batch, 1), self.bos_id, jnp.int32), toks.T], axis=1)


class DyckOracle(_StateMachineOracle):
    """A probabilistic Dyck-k grammar with bounded depth: samples are checkable (``is_valid``).

    Tokens: 0 = BOS, ``1..k`` open brackets, ``k+1..2k`` the matching closers. At depth 0 the source
    opens a uniformly chosen bracket; at ``max_depth`` it must close the top one; otherwise it opens
    with probability ``p_open`` (type uniform) or closes the top. Sequences are valid Dyck prefixes.
    ``noise`` mixes in a uniform distribution over all tokens so that every conditional is
    positive (reverse KL and the oracle NLL of invalid model samples stay finite); with
    ``noise=0`` the grammar is exact and an invalid token has oracle probability 0.
    After an invalid token the oracle ignores it (the stack is unchanged) and carries on.
    """

    def __init__(self, *, n_types: int = 2, max_depth: int = 8, p_open: float = 0.5, noise: float = 0.0):
        if n_types < 1 or max_depth < 1:
            raise ValueError(f"DyckOracle needs n_types >= 1 and max_depth >= 1, got {n_types}, {max_depth}")
        if not 0.0 < p_open < 1.0:
            raise ValueError(f"p_open={p_open} must be in (0, 1)")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise={noise} must be in [0, 1)")
        self.n_types, self.max_depth, self.p_open, self.noise = n_types, max_depth, p_open, noise
        self.vocab_size, self.bos_id = 2 * n_types + 1, 0
        super().__init__()
        # The noise-free grammar that judges validity (built once: its jitted scan is reused).
        self._exact = self if noise == 0.0 else DyckOracle(n_types=n_types, max_depth=max_depth, p_open=p_open)

    # State: (stack [B, D] of open types 1..k, depth [B]).
    def _init(self, batch):
        return jnp.zeros((batch, self.max_depth), jnp.int32), jnp.zeros((batch,), jnp.int32)

    def _grammar_probs(self, state):  # [B, V], the noise-free grammar
        stack, depth = state
        k = self.n_types
        top = jnp.take_along_axis(stack, jnp.maximum(depth - 1, 0)[:, None], axis=1)[:, 0]  # [B]
        p_open = jnp.where(depth == 0, 1.0, jnp.where(depth >= self.max_depth, 0.0, self.p_open))  # [B]
        opens = jnp.broadcast_to((p_open / k)[:, None], (stack.shape[0], k))
        closes = jax.nn.one_hot(top - 1, k) * (1.0 - p_open)[:, None]
        return jnp.concatenate([jnp.zeros_like(p_open)[:, None], opens, closes], axis=1)

    def _dist(self, state):
        p = self._grammar_probs(state)
        if self.noise:
            # Over every token, BOS included: a model may emit anything, and each score must stay finite.
            p = (1.0 - self.noise) * p + self.noise / self.vocab_size
        return jnp.log(p)

    def _update(self, state, tok):
        stack, depth = state
        k = self.n_types
        legal = jnp.take_along_axis(self._grammar_probs(state), tok[:, None], axis=1)[:, 0] > 0
        is_open = legal & (tok >= 1) & (tok <= k)
        is_close = legal & (tok > k)
        slot = jnp.minimum(depth, self.max_depth - 1)
        pushed = stack.at[jnp.arange(stack.shape[0]), slot].set(tok)
        stack = jnp.where(is_open[:, None], pushed, stack)
        depth = depth + is_open.astype(jnp.int32) - is_close.astype(jnp.int32)
        return stack, depth

    def is_valid(self, tokens) -> np.ndarray:
        """[B] bool: every token after BOS is a legal move of the grammar (a valid bounded Dyck prefix)."""
        tokens = _check_tokens(tokens, self.vocab_size, self.bos_id)
        lp = self._exact.log_probs(tokens)[:, :-1]  # [B, T-1, V]
        got = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
        return np.asarray(jnp.all(jnp.isfinite(got), axis=1) & (tokens[:, 0] == self.bos_id))


class TransformerOracle:
    """An arjax ``Transformer`` with fixed weights as an oracle: ``o = softmax(logits / temperature)``.

    With random weights (``TransformerOracle.random``) it is the synthetic source of the study; with
    trained weights it is the scorer for real text, where no true oracle exists. Samples come from
    the jitted decoder (``arjax.decode.generate``) at the oracle's temperature, so they are exact draws.
    """

    def __init__(self, model, *, temperature: float = 1.0, bos_id: int = 0):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive (it divides the logits)")
        self.model, self.temperature = model, float(temperature)
        self.vocab_size, self.bos_id = model.cfg.vocab_size, bos_id
        if not 0 <= bos_id < self.vocab_size:
            raise ValueError(f"bos_id={bos_id} is outside the vocabulary [0, {self.vocab_size})")
        self._graphdef, self._params = nnx.split(model)

    @classmethod
    def random(cls, cfg, *, seed: int = 0, init_std: float = 0.3, temperature: float = 1.0) -> TransformerOracle:
        """A transformer with random weights drawn at ``init_std`` (larger than the training init, so
        the conditionals are far from uniform and depend on the context)."""
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive (it divides the logits)")
        model = Transformer(cfg.replace(init_std=float(init_std), dropout=0.0), rngs=nnx.Rngs(seed_key(seed)))
        return cls(model, temperature=temperature)

    def log_probs(self, tokens) -> jax.Array:
        """[B, T] token ids (column 0 = BOS) -> [B, T, V] exact next-token log-probabilities."""
        tokens = _check_tokens(tokens, self.vocab_size, self.bos_id)
        if tokens.shape[1] > self.model.cfg.max_len:
            raise ValueError(
                f"sequences of {tokens.shape[1]} tokens exceed the oracle's max_len={self.model.cfg.max_len}; "
                "use shorter sequences or build the oracle with a larger max_len"
            )
        return _tempered_log_probs(self._graphdef, self._params, tokens, self.temperature)

    def sample(self, key, batch: int, length: int) -> jax.Array:
        """BOS followed by ``length`` tokens drawn by the jitted decoder at the oracle's temperature."""
        _check_sample_args(batch, length)
        if length + 1 > self.model.cfg.max_len:
            raise ValueError(f"length={length} + BOS exceeds the oracle's max_len={self.model.cfg.max_len}")
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        out = generate(
            self.model,
            [[self.bos_id]] * batch,
            max_new_tokens=length,
            sampling=SamplingParams.make(batch, temperature=self.temperature),
            seed=seed,
        )
        toks = np.asarray(out.tokens)[:, :length]
        bos = np.full((batch, 1), self.bos_id, np.int32)
        return jnp.asarray(np.concatenate([bos, toks.astype(np.int32)], axis=1))


@functools.partial(jax.jit, static_argnums=0)
def _tempered_log_probs(graphdef, params, tokens, temperature):
    logits, _ = nnx.merge(graphdef, params)(tokens)  # [B, T, V]
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def entropy_rate(oracle, tokens) -> float:
    """Mean per-token entropy (nats) of the oracle's conditionals along ``tokens`` [B, T]."""
    lp = oracle.log_probs(tokens)[:, :-1]  # [B, T-1, V]
    p = jnp.exp(lp)
    return float(-(jnp.where(p > 0, p * lp, 0.0)).sum(-1).mean())


def make_dataset(oracle, *, seed: int, n: int, length: int, chunk: int = 256) -> np.ndarray:
    """``n`` sequences ``[BOS, x_1..x_length]`` drawn from ``oracle``, a pure function of ``seed``.

    Drawn in equal chunks (each chunk's key is ``fold_in(seed, i)``; the last is truncated, so one
    compiled sampler serves every chunk) so memory stays bounded; train and test sets use different seeds.
    """
    if n <= 0 or length <= 0:
        raise ValueError(f"make_dataset needs n > 0 and length > 0, got n={n}, length={length}")
    key = seed_key(seed)
    chunk = min(chunk, n)
    parts = [np.asarray(oracle.sample(jax.random.fold_in(key, i), chunk, length)) for i in range(math.ceil(n / chunk))]
    return np.concatenate(parts, axis=0)[:n].astype(np.int32)
