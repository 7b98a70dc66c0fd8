"""The one step's bookkeeping (decode/step.py): its rules written out, and the block rule against the one-token rule."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from arjax.decode.step import RUNNING, STOP_EOS, STOP_LENGTH, emit, prompt_presence

V = 11


@st.composite
def rows(draw, block: bool):
    """A batch of rows in every situation a loop meets: done or running, at or below the budget, EOS ids
    per row or shared, -1 padding in the EOS list; with ``block``, K tokens of which each row proposes some."""
    B = draw(st.integers(1, 5))
    K = draw(st.integers(1, 4)) if block else 1
    ints = lambda lo, hi, n: np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), np.int32)
    max_steps = np.int32(draw(st.integers(1, 6)))
    emitted = np.minimum(ints(0, 6, B), max_steps - 1)  # a running row has budget left
    done = np.array(draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    per_row = draw(st.booleans())
    eos = ints(-1, V - 1, B * 3).reshape(B, 3) if per_row else ints(-1, V - 1, 2)
    tokens = ints(0, V - 1, B * K).reshape(B, K)
    proposed = ints(1, K, B)
    logits = np.asarray(draw(st.lists(st.floats(-4, 4), min_size=B * K * V, max_size=B * K * V)), np.float32)
    return dict(
        tokens=tokens,
        proposed=proposed,
        done=done,
        emitted=emitted,
        max_steps=max_steps,
        eos=eos,
        logits=logits.reshape(B, K, V),
    )


def _expected_block(r, pad_id):
    """The rule, one row at a time in plain Python: keep the proposed tokens up to and including the
    first EOS, at most the budget left; a done row keeps nothing."""
    out = []
    for b in range(len(r["done"])):
        eos = set(int(e) for e in (r["eos"][b] if r["eos"].ndim == 2 else r["eos"]) if e >= 0)
        kept, reason = [], RUNNING
        if not r["done"][b]:
            for t in r["tokens"][b, : r["proposed"][b]]:
                if r["emitted"][b] + len(kept) >= r["max_steps"]:
                    break
                kept.append(int(t))
                if int(t) in eos:
                    reason = STOP_EOS
                    break
            if reason == RUNNING and r["emitted"][b] + len(kept) >= r["max_steps"]:
                reason = STOP_LENGTH
        out.append((kept, reason))
    return out


@settings(max_examples=30, deadline=None)
@given(rows(block=True))
def test_a_block_keeps_tokens_up_to_eos_and_the_budget(r):
    em = emit(
        jnp.asarray(r["logits"]),
        jnp.asarray(r["tokens"]),
        done=jnp.asarray(r["done"]),
        emitted=jnp.asarray(r["emitted"]),
        max_steps=r["max_steps"],
        eos=jnp.asarray(r["eos"]),
        pad_id=7,
        proposed=jnp.asarray(r["proposed"]),
    )
    logp = jax.nn.log_softmax(r["logits"], axis=-1)
    reasons = np.asarray(em.stop_reason(jnp.zeros(len(r["done"]), jnp.int32)))
    for b, (kept, reason) in enumerate(_expected_block(r, pad_id=7)):
        n = len(kept)
        assert int(em.count[b]) == n
        assert list(np.asarray(em.tokens[b, :n])) == kept and (np.asarray(em.tokens[b, n:]) == 7).all()
        np.testing.assert_allclose(
            np.asarray(em.logprobs[b, :n]), [logp[b, i, t] for i, t in enumerate(kept)], rtol=1e-5
        )
        assert (np.asarray(em.logprobs[b, n:]) == 0).all()
        assert int(reasons[b]) == reason
        assert bool(em.done(jnp.asarray(r["done"]))[b]) == (bool(r["done"][b]) or reason != RUNNING)
    seen = np.asarray(em.seen(jnp.zeros((len(r["done"]), V), bool)))
    for b, (kept, _) in enumerate(_expected_block(r, pad_id=7)):
        assert set(np.flatnonzero(seen[b])) == set(kept)


@settings(max_examples=30, deadline=None)
@given(rows(block=False))
def test_one_token_per_row_is_the_block_rule_with_k_1(r):
    """The one-token case is written out (the plain loop's program is unchanged by the shared step);
    it must agree with the block rule on every field, EOS shared or per row, done rows, the budget."""
    common = dict(
        done=jnp.asarray(r["done"]),
        emitted=jnp.asarray(r["emitted"]),
        max_steps=r["max_steps"],
        eos=jnp.asarray(r["eos"]),
        pad_id=3,
    )
    one = emit(jnp.asarray(r["logits"][:, 0]), jnp.asarray(r["tokens"][:, 0]), **common)
    block = emit(
        jnp.asarray(r["logits"]), jnp.asarray(r["tokens"]), proposed=jnp.ones(len(r["done"]), jnp.int32), **common
    )
    np.testing.assert_array_equal(one.tokens, block.tokens[:, 0])
    np.testing.assert_allclose(one.logprobs, block.logprobs[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(one.new, block.new)
    np.testing.assert_array_equal(one.hit_eos, block.hit_eos)
    np.testing.assert_array_equal(one.hit_len, block.hit_len)
    presence = jnp.zeros((len(r["done"]), V), bool)
    np.testing.assert_array_equal(one.seen(presence), block.seen(presence))


def test_prompt_presence_ignores_padding_and_repeats():
    tokens = jnp.array([[5, 5, 2, 9], [0, 0, 4, 4]])
    real = jnp.array([[True, True, True, True], [False, False, True, True]])  # row 1 is left-padded with 0
    seen = np.asarray(prompt_presence(tokens, real, 10))
    assert [list(np.flatnonzero(s)) for s in seen] == [[2, 5, 9], [4]]
