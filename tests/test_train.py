"""The train step: overfitting, token-weighted gradient accumulation, traced seeds, the weight-decay
mask, the LR schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from arjax.model import Transformer, get_config
from arjax.train.data import get_batch
from arjax.train.optim import decay_mask, lr_schedule, make_optimizer
from arjax.train.step import TRACE_COUNTS, TeacherForcing, make_eval_step, make_train_step


def _setup(seed=0, **opt):
    model = Transformer(get_config("tiny"), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    kw = dict(lr=1e-2, warmup_steps=5, decay_steps=100, min_lr=1e-3, weight_decay=0.1)
    kw.update(opt)
    tx, _ = make_optimizer(**kw)
    return graphdef, params, tx


def test_tiny_model_overfits_a_repeated_pattern():
    graphdef, params, tx = _setup()
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, tx)
    ids = np.frombuffer(b"abcdefghijklmnop" * 100, dtype=np.uint8).astype(np.int32)
    for s in range(60):
        batch = get_batch(ids, batch_size=8, seq_len=32, seed=0, step=s)[None]  # [A=1, B, T+1]
        params, opt_state, m = step_fn(params, opt_state, batch, s, 0)
    assert float(m["loss"]) < 0.05, float(m["loss"])
    val = make_eval_step(graphdef)(params, get_batch(ids, batch_size=4, seq_len=32, seed=1, step=0)[None])
    assert float(val) < 0.05


def test_two_micro_batches_equal_one_big_batch():
    graphdef, params, tx = _setup(grad_clip=None)
    ids = np.random.default_rng(0).integers(0, 256, size=2000).astype(np.int32)
    big = get_batch(ids, batch_size=8, seq_len=16, seed=0, step=0)  # [8, 17]
    step_fn = make_train_step(graphdef, tx)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # the step donates its inputs
    p1, _, m1 = step_fn(copy(params), tx.init(params), big[None], 3, 0)
    p2, _, m2 = step_fn(copy(params), tx.init(params), big.reshape(2, 4, 17), 3, 0)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_skips_norms_biases_and_embeddings():
    model = Transformer(get_config("tiny"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(params))
    blk = mask["blocks"][0]
    assert blk["attn"]["q"]["kernel"] and blk["mlp"]["up"]["kernel"]
    assert not blk["attn"]["q"]["bias"] and not blk["ln1"]["scale"] and not blk["ln2"]["bias"]
    assert not mask["ln_f"]["scale"] and not mask["embed"]["embedding"] and not mask["pos_embed"]["embedding"]
    assert nnx.to_pure_dict(decay_mask(params, decay_embeddings=True))["embed"]["embedding"]


def test_weight_decay_leaves_masked_params_alone():
    """With zero gradients only decay moves params: decayed kernels shrink, norms and biases stay put."""
    graphdef, params, tx = _setup(lr=0.1, warmup_steps=0, decay_steps=10, min_lr=0.1, weight_decay=0.5)
    opt_state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, opt_state, params)
    new = nnx.to_pure_dict(optax.apply_updates(params, updates))
    old = nnx.to_pure_dict(params)
    np.testing.assert_allclose(
        new["blocks"][0]["attn"]["q"]["kernel"], old["blocks"][0]["attn"]["q"]["kernel"] * (1 - 0.05), rtol=1e-6
    )
    for path in (("ln_f", "scale"), ("embed", "embedding")):
        np.testing.assert_array_equal(new[path[0]][path[1]], old[path[0]][path[1]])
    np.testing.assert_array_equal(new["blocks"][1]["mlp"]["up"]["bias"], old["blocks"][1]["mlp"]["up"]["bias"])


def test_lr_schedule_warmup_then_cosine_to_min():
    sched = lr_schedule(lr=1e-3, warmup_steps=10, decay_steps=100, min_lr=1e-4)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(55)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-4)
    assert float(sched(100)) == pytest.approx(1e-4) and float(sched(500)) == pytest.approx(1e-4)


def test_dropout_key_depends_on_seed_and_step_only_and_seeds_share_one_program():
    """Same (seed, step) -> same dropout mask -> same loss; another step or seed -> different; one compile."""
    cfg = get_config("tiny", dropout=0.5)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.0)
    step_fn = make_train_step(graphdef, tx, TeacherForcing(dropout=True))
    batch = np.random.default_rng(0).integers(0, 256, size=(1, 4, 17)).astype(np.int32)
    run = lambda s, seed=0: float(step_fn(jax.tree.map(jnp.copy, params), tx.init(params), batch, s, seed)[2]["loss"])
    before = TRACE_COUNTS["train_step"]
    assert run(5) == run(5) and run(5) != run(6) and run(5, seed=1) != run(5)
    assert run(5, seed=2**40) == run(5, seed=2**40)
    assert TRACE_COUNTS["train_step"] - before == 1, "the seed is traced: every seed reuses the program"
    off = make_train_step(graphdef, tx)  # TeacherForcing() without dropout: the loss is deterministic
    assert float(off(jax.tree.map(jnp.copy, params), tx.init(params), batch, 5, 0)[2]["loss"]) == float(
        off(jax.tree.map(jnp.copy, params), tx.init(params), batch, 6, 1)[2]["loss"]
    )


def test_bf16_compute_keeps_fp32_master_weights():
    cfg = get_config("tiny", dtype="bfloat16")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(lr=1e-2, warmup_steps=0, decay_steps=10, min_lr=1e-3, weight_decay=0.1)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, tx)
    batch = np.random.default_rng(0).integers(0, 256, size=(1, 4, 17)).astype(np.int32)
    before = jax.tree.map(np.asarray, params)
    params, opt_state, m = step_fn(params, opt_state, batch, 0, 0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt_state) if x.ndim)
    assert np.isfinite(float(m["loss"])) and not np.array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(before)[0])
