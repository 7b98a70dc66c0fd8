"""Model-level guarantees the decoder relies on: causality, and cached decoding == the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.decode import SamplingParams, decode_step, init_state, prefill
from arjax.model import Transformer, get_config, init_cache

CONFIGS = {
    "tiny": get_config("tiny"),
    "llama-style": get_config("tiny").replace(
        pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, use_bias=False, tie_embeddings=False
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return Transformer(CONFIGS[request.param], rngs=nnx.Rngs(0))


def _forward(model):
    """The teacher-forced forward pass without a cache, jitted over the split state."""
    graphdef, params = nnx.split(model)
    f = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    return lambda tokens: np.asarray(f(params, jnp.asarray(tokens)))


def test_changing_a_future_token_never_changes_earlier_logits(model):
    V = model.cfg.vocab_size
    tokens = np.random.default_rng(0).integers(0, V, size=(2, 12))
    changed = tokens.copy()
    changed[:, 7] = (changed[:, 7] + 1) % V
    forward = _forward(model)
    a, b = forward(tokens), forward(changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert np.abs(a[:, 7:] - b[:, 7:]).max(axis=-1).min() > 1e-6  # the change is seen from position 7 on


def test_cached_decoding_matches_the_full_forward_pass_at_every_step(model):
    """Mixed prompt lengths in one left-padded batch: prefill, then decode_step under lax.scan."""
    cfg = model.cfg
    lengths, K, P = (3, 7, 12), 6, 12
    B = len(lengths)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, cfg.vocab_size, size=L + K) for L in lengths]
    tokens = np.zeros((B, P), np.int32)
    positions = np.full((B, P), -1, np.int32)
    for i, L in enumerate(lengths):
        tokens[i, P - L :] = seqs[i][:L]
        positions[i, P - L :] = np.arange(L)
    forced = np.stack([[s[L + j] for s, L in zip(seqs, lengths)] for j in range(K)]).astype(np.int32)  # [K, B]

    graphdef, params = nnx.split(model)

    @jax.jit
    def cached(params, tokens, positions, forced):
        m = nnx.merge(graphdef, params)
        logits, cache = prefill(m, tokens, positions, init_cache(cfg, B, P + K))
        state = init_state(logits, cache, tokens, positions, num_slots=K, rng=jax.random.key(0))

        def step(s, tok):
            s = decode_step(m, s, SamplingParams.greedy(B), forced_tokens=tok)
            return s, s.logits

        _, step_logits = jax.lax.scan(step, state, forced)
        return logits, step_logits  # [B, V], [K, B, V]

    first, rest = cached(params, tokens, positions, forced)
    got = np.concatenate([np.asarray(first)[None], np.asarray(rest)])  # [K + 1, B, V]
    # The reference: each row unpadded from position 0 (right-padded to one width; causality
    # keeps the padding out of the logits compared).
    full = np.zeros((B, P + K), np.int32)
    for i, s in enumerate(seqs):
        full[i, : len(s)] = s
    reference = _forward(model)(full)  # [B, P + K, V]
    for i, L in enumerate(lengths):
        want = reference[i, L - 1 : L + K]  # logits after the prompt and after each forced token
        diff = np.abs(got[:, i] - want).max()
        assert diff <= 1e-4, f"row {i} (prompt length {L}): cached logits differ by {diff}"
