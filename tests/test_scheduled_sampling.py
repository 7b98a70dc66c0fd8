"""Scheduled sampling: the closed-form optimum (through the one train step), alignment of fed-back
predictions, gradients, coins, the objective."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from arjax.model import Transformer, get_config
from arjax.train.exposure.scheduled_sampling import ScheduledSampling, ScheduledSamplingConfig, draw_coins, ss_loss
from arjax.train.exposure.schedules import GoldSchedule, constant, make_schedule
from arjax.train.loss import next_token_loss
from arjax.train.step import TRACE_COUNTS, make_train_step

# ----------------------------------------------------------------------------- closed form
# Oracle over tokens {1, 2, 3} (0 is BOS): x1 ~ o(x1), x2 ~ o(x2 | x1), chosen so that o(x2 | a)
# and the marginal o(x2) are far apart and the test can tell them apart.
O1 = np.array([0.5, 0.3, 0.2])
O21 = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])
O2 = O1 @ O21


def train_closed_form(ps, *, rows=1000, steps=200, lr=1e-2, seed=0):
    """Train one tiny model per replacement probability p through the one train step
    (``make_train_step`` with the ``ScheduledSampling`` objective, two-pass, sampled feedback).

    The batch is the same every step: ``rows`` sequences [BOS, x1, x2] in exactly the oracle's
    proportions (every o(x1, x2) is a multiple of 0.01), so the only randomness is scheduled
    sampling's own: the coins and the sampled draws. The p's differ only in the schedule's number,
    which is traced: the three runs share one compiled step.
    Returns q(x1 | BOS) [len(ps), 3] and q(x2 | a) [len(ps), 3 (a), 3 (x2)].
    """
    counts = np.rint(rows * O1[:, None] * O21).astype(int)  # [3, 3]
    assert counts.sum() == rows
    pairs = [(0, a + 1, b + 1) for a in range(3) for b in range(3) for _ in range(counts[a, b])]
    batch = jnp.asarray(pairs, jnp.int32)[None]  # [A=1, rows, T+1=3]
    # Untied embeddings: the input table and the output head learn independently (a tied table makes
    # the pass-2 noise on the input side disturb q(x1 | BOS), which slows convergence).
    cfg = get_config("tiny", vocab_size=8, max_len=8, d_model=32, n_layers=1, n_heads=2, tie_embeddings=False)
    graphdef, params0 = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

    def objective(p):  # the slot-1 input is replaced with probability p: gold probability 1 - p
        return ScheduledSampling(cfg=ScheduledSamplingConfig(feed="sample", schedule=constant(1.0 - p)))

    step_fn = make_train_step(graphdef, tx, objective(0.0))
    before = TRACE_COUNTS["train_step"]
    probe = jnp.array([[0, 1], [0, 2], [0, 3]])  # [BOS, a] for a = 1, 2, 3
    q1, q2 = [], []
    for p in ps:
        params, opt_state = jax.tree.map(jnp.copy, params0), tx.init(params0)
        for i in range(steps):
            params, opt_state, m = step_fn(params, opt_state, batch, i, seed, objective(p))
        np.testing.assert_allclose(float(m["mix_rate"]), p, atol=0.03)  # realised mixing follows the schedule
        logits, _ = nnx.merge(graphdef, params)(probe)  # [3, 2, V]
        pr = np.asarray(jax.nn.softmax(logits, -1)[..., 1:4])  # [3, 2, 3]
        q1.append(pr[0, 0])
        q2.append(pr[:, 1])
    assert TRACE_COUNTS["train_step"] - before == 1, "a new schedule number must not recompile the step"
    return np.array(q1), np.array(q2)


@pytest.mark.slow
def test_two_pass_converges_to_the_closed_form_optimum():
    """q*(x2 | a) = (1 - p) o(x2 | a) + p o(x2); an off-by-one feed or a gradient leak lands elsewhere."""
    ps = [0.0, 0.5, 1.0]
    q1, q2 = train_closed_form(ps)
    for i, p in enumerate(ps):
        want = (1 - p) * O21 + p * O2[None, :]
        np.testing.assert_allclose(q1[i], O1, atol=0.02, err_msg=f"q(x1 | BOS) at p={p}")
        np.testing.assert_allclose(q2[i], want, atol=0.02, err_msg=f"q(x2 | a) at p={p}")


# ----------------------------------------------------------------------------- alignment with a known model


class NextIsPlusOne:
    """A stand-in model whose prediction after token x is always x + 1 (mod V), with one-hot embeddings.

    It records the inputs of every call, so a test can see exactly what each pass was fed.
    """

    def __init__(self, vocab: int = 10):
        self.V = vocab
        self.cfg = types.SimpleNamespace(vocab_size=vocab)
        self.calls = []

    def embed_tokens(self, tokens):
        return jax.nn.one_hot(tokens, self.V)  # [B, T, V]: the embedding of a token is its one-hot

    def embed_soft(self, probs):
        return probs  # the mixture of one-hot embeddings is the distribution itself

    def hidden(self, tokens=None, positions=None, cache=None, *, embeddings=None, dropout_rng=None):
        x = self.embed_tokens(tokens) if embeddings is None else embeddings  # [B, T, V]
        self.calls.append(x)
        return x, None

    def logits(self, h):
        return 20.0 * jnp.roll(h, 1, axis=-1)  # logits peak at (input + 1) mod V

    def __call__(self, tokens=None, positions=None, cache=None, *, embeddings=None, dropout_rng=None):
        h, _ = self.hidden(tokens, positions, cache, embeddings=embeddings, dropout_rng=dropout_rng)
        return self.logits(h), None


@pytest.mark.parametrize("feed", ["argmax", "sample", "soft", "soft_topk", "gumbel"])
def test_the_prediction_from_position_t_minus_1_replaces_input_t(feed):
    model = NextIsPlusOne()
    tokens = jnp.array([[5, 0, 3, 7, 2], [9, 9, 1, 4, 4]])  # [B, T+1]
    cfg = ScheduledSamplingConfig(feed=feed, temperature=0.05, top_k=2 if feed == "soft_topk" else 0)
    loss, aux = ss_loss(
        model, tokens, jax.random.key(0), 0.0, cfg
    )  # gold probability 0: every input t >= 1 is the model's
    gold_inputs = tokens[:, :-1]  # [B, T]
    # Pass 1 saw the gold inputs; pass 2 sees x_0, then the prediction made at t-1 for token t: x_{t-1} + 1.
    want = jnp.concatenate([gold_inputs[:, :1], (gold_inputs[:, :-1] + 1) % 10], axis=1)  # [5, 6, 1, 4], [9, 0, 0, 2]
    np.testing.assert_array_equal(jnp.argmax(model.calls[0], -1), gold_inputs)
    np.testing.assert_array_equal(jnp.argmax(model.calls[1], -1), want)
    np.testing.assert_array_equal(aux["fed_tokens"][:, 1:], want[:, 1:])
    assert not aux["use_model"][:, 0].any(), "input 0 is never predicted, so never replaced"
    # All 3 + 3 replaceable inputs were fed; the counter agrees with a direct comparison with gold.
    assert int(aux["n_fed"]) == 6 and float(aux["mix_rate"]) == 1.0
    assert int(aux["n_differ"]) == int((want != gold_inputs)[:, 1:].sum())


def _tiny(seed, n_layers=1, init_std=0.02):
    cfg = get_config("tiny", vocab_size=16, max_len=8, n_layers=n_layers, init_std=init_std)
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


def _jit_loss(graphdef, cfg):
    """ss_loss jitted over the split state (eager op-by-op dispatch is slow on a shared CPU)."""
    return jax.jit(lambda params, tokens, key, gold: ss_loss(nnx.merge(graphdef, params), tokens, key, gold, cfg))


def test_sequential_equals_greedy_rollout_and_k_pass_reaches_it_after_T_passes():
    """Gold probability 0 with argmax feedback is greedy decoding from x_0; gold probability 1 is teacher forcing."""
    # Two layers: the cache must carry every layer's keys. A wide init spreads the logits, so no argmax
    # is a near-tie that rounding in the cached vs full forward pass could flip.
    graphdef, params = _tiny(3, n_layers=2, init_std=0.5)
    T = 5
    tokens = jax.random.randint(jax.random.key(4), (2, T + 1), 0, 16)
    # Reference: feed x0, then each argmax prediction, recomputing the whole prefix (no cache).
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
    seq = tokens[:, :1]
    for _ in range(T - 1):
        seq = jnp.concatenate([seq, jnp.argmax(fwd(params, seq)[:, -1], -1)[:, None].astype(seq.dtype)], axis=1)
    ref_loss = next_token_loss(fwd(params, seq), tokens[:, 1:])[0]
    key = jax.random.key(5)
    seq_fn = _jit_loss(graphdef, ScheduledSamplingConfig(method="sequential", feed="argmax"))
    seq_loss, aux = seq_fn(params, tokens, key, 0.0)
    np.testing.assert_array_equal(aux["fed_tokens"][:, 1:], seq[:, 1:])
    np.testing.assert_allclose(float(seq_loss), float(ref_loss), rtol=1e-5)
    # Pass k has the exact roll-out inputs up to position k-1, so T passes reproduce sequential exactly.
    k_fn = _jit_loss(graphdef, ScheduledSamplingConfig(num_passes=T, feed="argmax"))
    k_loss, k_aux = k_fn(params, tokens, key, 0.0)
    np.testing.assert_array_equal(k_aux["fed_tokens"][:, 1:], seq[:, 1:])
    np.testing.assert_allclose(float(k_loss), float(ref_loss), rtol=1e-5)
    # The same holds for mixtures (the sequential soft path is its own scan step).
    soft = ScheduledSamplingConfig(method="sequential", feed="soft_topk", top_k=3, temperature=0.7)
    soft_seq, _ = _jit_loss(graphdef, soft)(params, tokens, key, 0.0)
    soft_k, _ = _jit_loss(graphdef, soft.replace(method="parallel", num_passes=T))(params, tokens, key, 0.0)
    np.testing.assert_allclose(float(soft_seq), float(soft_k), rtol=1e-4)
    # The gold probability is traced: the same compiled objectives at gold probability 1 are teacher forcing.
    tf_loss = next_token_loss(fwd(params, tokens[:, :-1]), tokens[:, 1:])[0]
    for loss_fn in (seq_fn, k_fn):
        loss, aux = loss_fn(params, tokens, key, 1.0)
        np.testing.assert_allclose(float(loss), float(tf_loss), rtol=1e-5)
        assert float(aux["mix_rate"]) == 0.0 and float(aux["differ_rate"]) == 0.0


def test_gradient_through_pass1_is_off_unless_asked():
    graphdef, params = _tiny(6)
    tokens = jax.random.randint(jax.random.key(7), (2, 6), 0, 16)
    key = jax.random.key(8)
    off = ScheduledSamplingConfig(feed="soft", grad_through_pass1=False)
    on = off.replace(grad_through_pass1=True)

    def grad_fn(cfg):
        return jax.jit(jax.grad(lambda p: ss_loss(nnx.merge(graphdef, p), tokens, key, 0.0, cfg)[0]))

    # Reference for "off": the mixture fed to pass 2 is computed first and held constant.
    const = nnx.merge(graphdef, params)
    logits1, _ = const(tokens[:, :-1])  # [B, T, V]
    soft_emb = const.embed_soft(jax.nn.softmax(logits1[:, :-1], -1))  # prediction at t-1 feeds input t

    @jax.jit
    @jax.grad
    def frozen_feed_grad(p):
        model = nnx.merge(graphdef, p)
        emb = jnp.concatenate([model.embed_tokens(tokens[:, :1]), soft_emb], axis=1)  # [B, T, D]
        logits2, _ = model(embeddings=emb)
        return next_token_loss(logits2, tokens[:, 1:])[0]

    g_off, g_on, g_ref = grad_fn(off)(params), grad_fn(on)(params), frozen_feed_grad(params)
    # embed_soft reads the embedding table, which the reference holds constant; compare everything else.
    not_embed = lambda g: jnp.concatenate(
        [x.ravel() for path, x in jax.tree_util.tree_leaves_with_path(g) if "embed" not in jax.tree_util.keystr(path)]
    )
    np.testing.assert_allclose(not_embed(g_off), not_embed(g_ref), rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(not_embed(g_on) - not_embed(g_off)).max()) > 1e-5, (
        "grad_through_pass1=True must change the gradient"
    )


def test_sequential_is_differentiable_through_the_scan():
    graphdef, params = _tiny(9)
    tokens = jax.random.randint(jax.random.key(10), (2, 6), 0, 16)
    cfg = ScheduledSamplingConfig(method="sequential", feed="gumbel", grad_through_pass1=True, pass1_weight=0.5)
    g = jax.jit(jax.grad(lambda p: ss_loss(nnx.merge(graphdef, p), tokens, jax.random.key(0), 0.5, cfg)[0]))(params)
    norms = [float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


# ----------------------------------------------------------------------------- coins


def test_coin_granularities():
    B, T, g = 4000, 6, 0.3
    key = jax.random.key(11)
    tok = np.asarray(draw_coins(key, g, B, T, "token"))
    seq = np.asarray(draw_coins(key, g, B, T, "sequence"))
    pre = np.asarray(draw_coins(key, g, B, T, "prefix"))
    for coins in (tok, seq, pre):
        assert not coins[:, 0].any()
        assert abs(coins[:, 1:].mean() - (1 - g)) < 0.02
    # sequence: a row is all model or all gold; prefix: gold first, then model to the end
    assert set(seq[:, 1:].sum(1)) == {0, T - 1}
    assert (np.diff(pre[:, 1:].astype(int), axis=1) >= 0).all()
    assert len(set(pre[:, 1:].sum(1))) == T  # every prefix length 0..T-1 occurs
    # position-dependent gold probability is honoured per position
    gp = jnp.array([1.0, 1.0, 0.8, 0.5, 0.2, 0.0])
    rate = np.asarray(draw_coins(key, gp, B, T, "token")).mean(0)
    np.testing.assert_allclose(rate, 1 - np.asarray(gp), atol=0.03)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(feed="beam"), "feed='beam'"),
        (dict(method="k_pass"), "method='k_pass'"),
        (dict(num_passes=1), "num_passes=1"),
        (dict(method="sequential", num_passes=3), "num_passes=3"),
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(feed="soft_topk"), "top_k=0"),
        (dict(top_k=5), "top_k=5"),
        (dict(gumbel_hard=True), "gumbel_hard"),
        (dict(pass1_weight=0.0, pass2_weight=0.0), "both 0"),
        (dict(pass1_weight=-1.0), "pass1_weight=-1.0 must be >= 0"),
        (dict(temperature=float("inf")), "temperature=inf must be a finite number"),
        (dict(granularity="row"), "granularity='row'"),
    ],
)
def test_bad_config_is_refused_with_the_value_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ScheduledSamplingConfig(**kw)


def test_config_is_strict_and_frozen():
    from arjax.train.exposure.scheduled_sampling import from_dict

    with pytest.raises(ValueError, match="unknown ScheduledSamplingConfig keys \\['tempreature'\\]"):
        from_dict({"tempreature": 1.0})
    with pytest.raises(TypeError):
        ScheduledSamplingConfig("parallel")  # type: ignore[misc]
    with pytest.raises(TypeError, match="num_passes"):
        ScheduledSamplingConfig(num_passes=2.0)  # type: ignore[arg-type]
    cfg = ScheduledSamplingConfig(schedule=make_schedule("linear", k=1.0, c=0.1))
    assert float(cfg.schedule(2, 4)[1]) == pytest.approx(0.8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.feed = "soft"  # type: ignore[misc]
    # The nested schedule, as a run config writes it; a number the family does not use is refused.
    cfg = from_dict(
        {
            "feed": "argmax",
            "schedule": {"step": {"kind": "linear", "k": 1, "c": 0.1}, "position": {"kind": "exponential", "k": 0.5}},
        }
    )
    np.testing.assert_allclose(np.asarray(cfg.schedule(2, 3)), [1.0, 0.8 * 0.5, 0.8 * 0.25], rtol=1e-6)
    with pytest.raises(ValueError, match=r"schedule 'constant' takes \['k'\], not \['c'\]"):
        from_dict({"schedule": {"step": {"kind": "constant", "k": 0.5, "c": 0.1}}})
    with pytest.raises(ValueError, match=r"unknown ScheduledSamplingConfig.schedule.step keys \['z'\]"):
        from_dict({"schedule": {"step": {"kind": "linear", "z": 1}}})
    with pytest.raises(TypeError, match="schedule k='high'"):
        from_dict({"schedule": {"step": {"kind": "linear", "k": "high"}}})


# ----------------------------------------------------------------------------- the objective in the one train step


def test_objective_logs_and_never_recompiles_for_a_new_step_or_schedule():
    graphdef, params = _tiny(12)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    sched = make_schedule("linear", k=1.0, c=0.4)  # 1.0, 0.6, 0.2, 0.0 ...
    objective = ScheduledSampling(cfg=ScheduledSamplingConfig(feed="argmax", schedule=sched), pad_id=15)
    step_fn = make_train_step(graphdef, tx, objective)
    batches = jax.random.randint(jax.random.key(13), (2, 4, 7), 0, 15)  # [A, B, T+1], no pad inside
    batches = batches.at[:, 0, -2:].set(15)  # one row per micro-batch ends in 2 pads: 2 fewer targets each
    before = TRACE_COUNTS["train_step"]
    logs = []
    for i in range(4):
        params, opt_state, m = step_fn(params, opt_state, batches, i, 0)
        logs.append({k: float(v) for k, v in m.items()})
    # New numbers for the same family: still the same program (a new family is a new program).
    new = objective.replace(
        cfg=objective.cfg.replace(schedule=GoldSchedule(step=make_schedule("linear", k=0.9, c=0.1)))
    )
    params, opt_state, m = step_fn(params, opt_state, batches, 4, 0, new)
    logs.append({k: float(v) for k, v in m.items()})
    assert TRACE_COUNTS["train_step"] - before == 1
    np.testing.assert_allclose([l["gold_prob"] for l in logs], [1.0, 0.6, 0.2, 0.0, 0.5], atol=1e-6)
    assert logs[0]["mix_rate"] == 0.0 and logs[0]["differ_rate"] == 0.0
    assert logs[3]["mix_rate"] == 1.0 and logs[3]["differ_rate"] > 0.5  # a random model's argmax is rarely gold
    assert all(np.isfinite(l["loss"]) and l["tokens"] == 2 * 4 * 6 - 2 * 2 for l in logs)
    # The step's loss is the objective's pass-2 loss (pass1_weight 0), token-weighted over micro-batches.
    assert logs[3]["loss"] == pytest.approx(logs[3]["pass2_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="pass \\[A micro-batches, B, T\\+1\\]"):
        step_fn(params, opt_state, batches[0], 5, 0)


def test_sequential_token_feeds_refuse_dropout():
    with pytest.raises(ValueError, match="has no dropout"):
        ScheduledSampling(cfg=ScheduledSamplingConfig(method="sequential", feed="argmax"), dropout=True)
