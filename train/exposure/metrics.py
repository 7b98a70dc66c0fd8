"""Exposure-bias metrics that are exact under an oracle: per-step errors, ExAccErr, KLs, EB-C, repetition, CIs.

Notation. ``o`` is the oracle (``arjax.train.exposure.oracles``), ``m`` the model, ``F`` a decoding strategy
(greedy, temperature, top-k, top-p) and ``m^F(. | c)`` the distribution the decoder actually draws
the next token from at context ``c`` (greedy: a point mass on the argmax). A *roll-in* is the way
contexts are produced: oracle roll-in draws ``x_<t ~ o`` (teacher forcing on oracle samples), model
roll-in draws ``x_<t ~ m^F`` (free running with the jitted decoder).

Every per-step quantity is computed from the full next-token distributions of ``o``, ``m`` and
``m^F`` at the context, never from a sampled next token; only the contexts are sampled, and the
functions take per-row ``weights`` so that on an enumerable oracle the expectation over contexts is
exact too (``tests/test_exposure.py`` checks this against brute-force enumeration).

Per-step losses ``l(c)`` (``step_losses``):
  - ``oracle_nll``  H(m^F, o) = -sum_a m^F(a|c) log o(a|c): the oracle NLL of the token the decoder
    emits, in expectation. Non-zero even for a perfect model, so ExAccErr is defined at m = o.
  - ``regret``      H(m^F, o) - H(o^F, o): the imitation-learning regret of the decoder against the
    oracle decoded the same way (o^F: the same filter applied to o) at the same context. Zero for a
    perfect model under any F and free of the context's own entropy (greedy: log o(argmax o) -
    log o(argmax m) >= 0), so it separates "the model decides worse" from "the context is harder".
  - ``kl``          KL(o || m), the forward (teacher-forcing) divergence per token.
  - ``reverse_kl``  KL(m || o); ``tv`` total variation; ``js`` Jensen-Shannon (nats), both of m vs o.
  - ``agree``       1[argmax m = argmax o] (per-position top-1 accuracy against the oracle).

Error accumulation (Arora, El Asri, Bahuleyan, Cheung 2022, "Why Exposure Bias Matters: An Imitation
Learning Perspective of Error Accumulation in Language Generation", Findings of ACL, Sec. 4), for a
prefix length ``l`` and one of the losses above:
  eps(l)      = (1/l) sum_{t=1..l} E_{x_<t ~ o}   [ l(x_<t) ]     per-step error under oracle roll-in
  R(l)        =       sum_{t=1..l} E_{x_<t ~ m^F} [ l(x_<t) ]     accumulated error under model roll-in
  AccErr(l)   = R(l) - l * eps(l)
  ExAccErr(l) = (R(l) / (l * eps(l)) - 1) * 100%                 excess error due to exposure bias
When ``m = o`` and F is ancestral sampling the two roll-ins have the same law, so ExAccErr = 0 up to
sampling noise of the contexts.

Conditional-divergence exposure bias (He, Zhang, Zhou, Glass 2021, "Exposure Bias versus
Self-Recovery: Are Distortions Really Incremental for Autoregressive Text Generation?", EMNLP, Sec. 3):
  CGD(l | roll-in) = E_{x_<l ~ roll-in} [ f(m(. | x_<l), o(. | x_<l)) ],  f = TV or JS
  EB-C(l)          = CGD(l | model roll-in) / CGD(l | oracle roll-in)   (> 1: exposure bias hurts)

Sequence-level numbers (per token): forward KL = (1/L) E_{x~o} log o(x)/m(x) = mean_t E_{x_<t~o} KL_t;
reverse KL = (1/L) E_{x~m} log m(x)/o(x) = mean_t E_{x_<t~m} KL(m_t || o_t); NLL-oracle of model
samples = (1/L) E_{x~m^F} [-log o(x)] = mean_t E_{x_<t~m^F} H(m^F_t, o_t) (the ``oracle_nll`` loss).
Repetition: seq-rep-n (Welleck et al. 2020) = 1 - unique n-grams / n-grams per sequence, and rep-w =
fraction of tokens that already occur in the previous w tokens. Confidence intervals are percentile
bootstraps over sequences. On real text there is no oracle: pass a ``TransformerOracle`` wrapping a
scorer model the user names and the same numbers are measured against the scorer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats  # a dependency of jax

from arjax.decode import SamplingParams, filter_logits, generate
from arjax.model.config import bounds, check_field_types
from arjax.model.rng import numpy_rng
from arjax.train.loss import token_nll

DEGENERATE = 1e-5  # per-step loss (nats) below which eps(l) counts as zero and ExAccErr as undefined
STEP_LOSSES = ("oracle_nll", "regret", "kl", "reverse_kl", "tv", "js", "agree")


# ----------------------------------------------------------------------------- decoding strategies


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoding:
    """A decoding strategy F: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 switch those filters off."""

    name: str
    temperature: float = dataclasses.field(default=1.0, metadata=bounds(0, fix="0 is greedy"))
    top_k: int = dataclasses.field(default=0, metadata=bounds(0, fix="0 turns it off"))
    top_p: float = dataclasses.field(default=1.0, metadata=bounds(0, 1, lo_open=True, fix="1 turns it off"))

    def __post_init__(self):
        check_field_types(self)

    @property
    def is_ancestral(self) -> bool:
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


def sampling_params(decoding: Decoding, batch: int):
    """The decoder's ``SamplingParams`` for ``decoding`` (one row each)."""
    return SamplingParams.make(batch, temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)


def policy_log_probs(logits: jax.Array, decoding: Decoding) -> jax.Array:
    """log m^F: the distribution the decoder samples from, [..., V] logits -> [..., V] log-probs.

    The decoder's own filter (``arjax.decode.sampling.filter_logits``: greedy keeps the argmax,
    otherwise temperature, top-k, top-p), so the metric scores exactly the policy that generates.
    """
    n = math.prod(logits.shape[:-1])
    return _policy_log_probs(jnp.asarray(logits), sampling_params(decoding, n))


@jax.jit
def _policy_log_probs(logits, sampling):  # [..., V]; sampling has one row per context
    flat = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)  # [N, V]
    return jax.nn.log_softmax(filter_logits(flat, sampling), -1).reshape(logits.shape)


# ----------------------------------------------------------------------------- per-step losses


def _xlogy_ratio(log_p, log_q):
    """sum_a p(a) (log p(a) - log q(a)) with 0 log 0 = 0 and p > 0, q = 0 giving +inf."""
    p = jnp.exp(log_p)
    return jnp.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def kl_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis, from log-probabilities [..., V] -> [...]."""
    return _xlogy_ratio(log_p, log_q)


def tv_distance(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    return 0.5 * jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)).sum(-1)


def js_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    log_mid = jnp.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * _xlogy_ratio(log_p, log_mid) + 0.5 * _xlogy_ratio(log_q, log_mid)


def step_losses(
    oracle_lp: jax.Array, model_lp: jax.Array, policy_lp: jax.Array, oracle_policy_lp: jax.Array
) -> dict[str, jax.Array]:
    """Every per-step loss of the module docstring at each context: [B, T, V] x4 -> {name: [B, T]}.

    ``oracle_lp`` = log o, ``model_lp`` = log m (temperature 1), ``policy_lp`` = log m^F,
    ``oracle_policy_lp`` = log o^F (the oracle decoded with the same strategy).
    """

    def cross_entropy(log_p, log_q):  # -sum p log q, with 0 * log 0 = 0
        p = jnp.exp(log_p)
        return jnp.where(p > 0, -p * log_q, 0.0).sum(-1)

    oracle_nll = cross_entropy(policy_lp, oracle_lp)
    return {
        "oracle_nll": oracle_nll,
        "regret": oracle_nll - cross_entropy(oracle_policy_lp, oracle_lp),
        "kl": kl_divergence(oracle_lp, model_lp),
        "reverse_kl": kl_divergence(model_lp, oracle_lp),
        "tv": tv_distance(model_lp, oracle_lp),
        "js": js_divergence(model_lp, oracle_lp),
        "agree": (jnp.argmax(model_lp, -1) == jnp.argmax(oracle_lp, -1)).astype(jnp.float32),
    }


_step_losses_jit = jax.jit(step_losses)

# ----------------------------------------------------------------------------- model and roll-outs


@functools.partial(jax.jit, static_argnums=0)
def _model_logits(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)[0]  # [B, T, V] float32


class ModelScorer:
    """``log m(. | prefix)`` for every prefix, jitted over ``nnx.split`` state (no per-call graph walk;
    models of one architecture share the compiled program)."""

    def __init__(self, model):
        self.model = model
        self._graphdef, self._params = nnx.split(model)

    def logits(self, tokens) -> jax.Array:
        return _model_logits(self._graphdef, self._params, jnp.asarray(tokens, jnp.int32))


def rollout(model, prompts, *, length: int, decoding: Decoding, seed: int) -> np.ndarray:
    """Free-running continuations from the jitted decoder: ``prompts`` [B, P] (BOS first for an oracle;
    equal lengths, so no padding) continued by ``length`` tokens -> [B, P + length] int32."""
    prompts = np.asarray(prompts, np.int32)
    out = generate(
        model, prompts.tolist(), max_new_tokens=length, sampling=sampling_params(decoding, len(prompts)), seed=seed
    )
    toks = np.asarray(out.tokens)[:, :length].astype(np.int32)
    if toks.shape[1] != length:
        raise RuntimeError(f"the decoder returned {toks.shape[1]} tokens, expected {length} (no EOS is set)")
    return np.concatenate([prompts, toks], axis=1)


def losses_along(
    oracle, scorer: ModelScorer, tokens: np.ndarray, decoding: Decoding, chunk: int = 256
) -> dict[str, np.ndarray]:
    """Per-step losses at every context of ``tokens`` [B, L+1] (BOS first) -> {name: [B, L]} numpy.

    Position t (0-based) is the prediction of x_{t+1} from [BOS, x_1..x_t].
    """
    parts: dict[str, list] = {k: [] for k in STEP_LOSSES}
    for i in range(0, len(tokens), chunk):
        x = jnp.asarray(tokens[i : i + chunk, :-1])
        logits = scorer.logits(x)
        o_lp = oracle.log_probs(x)
        # o^F: the same filter on the oracle's log-probs (log-probs are logits up to a per-row constant).
        o_pol = policy_log_probs(jnp.where(jnp.isfinite(o_lp), o_lp, -1e30), decoding)
        out = _step_losses_jit(o_lp, jax.nn.log_softmax(logits, -1), policy_log_probs(logits, decoding), o_pol)
        for k, v in out.items():
            parts[k].append(np.asarray(v))
    return {k: np.concatenate(v, 0) for k, v in parts.items()}


# ----------------------------------------------------------------------------- accumulation and CIs


def _weighted_mean(x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Mean over rows [B, ...] -> [...], with optional per-row weights (summing to 1)."""
    if weights is None:
        return x.mean(0)
    return np.tensordot(np.asarray(weights, np.float64), x.astype(np.float64), axes=(0, 0))


def accumulated_error(
    loss_model_rollin: np.ndarray,
    loss_oracle_rollin: np.ndarray,
    *,
    w_model: np.ndarray | None = None,
    w_oracle: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """R(l), l*eps(l), AccErr(l) and ExAccErr(l) [%] for l = 1..L from per-step losses [B, L]."""
    R = np.cumsum(_weighted_mean(loss_model_rollin, w_model))  # [L]
    l_eps = np.cumsum(_weighted_mean(loss_oracle_rollin, w_oracle))  # [L]
    with np.errstate(divide="ignore", invalid="ignore"):
        ex = (R / l_eps - 1.0) * 100.0
    # A loss that vanishes (regret or KL of the oracle against itself) leaves a ratio of rounding
    # errors: undefined, not a number to plot.
    ex = np.where(np.abs(l_eps) > DEGENERATE * np.arange(1, len(l_eps) + 1), ex, np.nan)
    return {"R": R, "l_eps": l_eps, "acc_err": R - l_eps, "ex_acc_err": ex}


def bootstrap_ci(
    stat: Callable[..., np.ndarray], *samples: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap: (estimate, low, high) of ``stat(*samples)``, resampling each sample's rows.

    Samples are resampled independently (e.g. the model roll-ins and the oracle roll-ins of ExAccErr).
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap needs n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    rng = numpy_rng(seed)
    est = np.asarray(stat(*samples), np.float64)
    boots = []
    for _ in range(n_boot):
        boots.append(stat(*[s[rng.integers(0, len(s), len(s))] for s in samples]))
    boots = np.asarray(boots, np.float64)
    with warnings.catch_warnings():  # a statistic that is 0/0 everywhere (the oracle against itself) gives NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(boots, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return est, lo, hi


def mean_ci(values, alpha: float = 0.05) -> tuple[float, float]:
    """Mean and half-width of a Student-t confidence interval over independent runs (e.g. seeds)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


# ----------------------------------------------------------------------------- repetition


def repetition_rates(tokens: np.ndarray, *, ns=(1, 2, 4), windows=(4, 16)) -> dict[str, float]:
    """seq-rep-n (1 - unique/total n-grams, averaged over sequences) and rep-w over generated tokens [B, L]."""
    tokens = np.asarray(tokens)
    out = {}
    for n in ns:
        reps = []
        for row in tokens:
            grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
            if grams:
                reps.append(1.0 - len(set(grams)) / len(grams))
        out[f"seq_rep_{n}"] = float(np.mean(reps)) if reps else float("nan")
    for w in windows:
        hits = [row[t] in row[max(0, t - w) : t] for row in tokens for t in range(1, len(row))]
        out[f"rep_{w}"] = float(np.mean(hits)) if hits else float("nan")
    return out


# ----------------------------------------------------------------------------- one model against an oracle


def evaluate(
    model,
    oracle,
    test_tokens: np.ndarray,
    decodings: tuple[Decoding, ...],
    *,
    n_rollouts: int,
    prompt_len: int = 0,
    seed: int = 0,
    n_boot: int = 200,
    ex_losses: tuple[str, ...] = ("regret", "kl", "oracle_nll"),
) -> dict:
    """Every metric for one model: teacher forcing on ``test_tokens`` (oracle roll-in, [N, L+1], BOS
    first) against free running with each decoding strategy (model roll-in, ``n_rollouts`` rows).

    Free running starts from the first ``prompt_len`` tokens after BOS of the test rows (cycled), as
    Arora et al. prompt with a data prefix: without a prompt every greedy roll-out is the same single
    sequence. Error accumulation is measured over the ``L - prompt_len`` generated positions, against
    the oracle roll-in at the same positions. Returns plain lists/floats (JSON-ready).
    """
    bad = [x for x in ex_losses if x not in STEP_LOSSES]
    if bad or not ex_losses:
        raise ValueError(f"ex_losses={ex_losses!r}; choose from {STEP_LOSSES}")
    test_tokens = np.asarray(test_tokens, np.int32)
    length = test_tokens.shape[1] - 1
    if not 0 <= prompt_len < length:
        raise ValueError(
            f"prompt_len={prompt_len} must be in [0, {length}) for sequences of {length} tokens; shorten the prompt"
        )
    if n_rollouts <= 0:
        raise ValueError(f"n_rollouts={n_rollouts} must be positive")
    p, gen = prompt_len, length - prompt_len
    scorer = ModelScorer(model)
    logits = scorer.logits(test_tokens[:, :-1])
    nll_test = float(token_nll(logits, jnp.asarray(test_tokens[:, 1:])).mean())
    result = {"length": gen, "prompt_len": p, "nll_test": nll_test, "decodings": {}}
    ancestral = Decoding(name="ancestral")
    tf_anc = losses_along(oracle, scorer, test_tokens, ancestral)
    result["teacher_forced"] = {k: v[:, p:].mean(0).tolist() for k, v in tf_anc.items()}
    result["forward_kl_per_token"] = float(tf_anc["kl"].mean())
    prompts = test_tokens[np.arange(n_rollouts) % len(test_tokens), : p + 1]  # [R, P+1]
    for i, dec in enumerate(decodings):
        free = rollout(model, prompts, length=gen, decoding=dec, seed=seed * 1000 + i)
        fr = {k: v[:, p:] for k, v in losses_along(oracle, scorer, free, dec).items()}  # generated positions
        tf = tf_anc if dec.is_ancestral else losses_along(oracle, scorer, test_tokens, dec)
        tf = {k: v[:, p:] for k, v in tf.items()}

        def ex_stat(a, b):
            return accumulated_error(a, b)["ex_acc_err"]

        ex = {}
        for loss in ex_losses:
            est, lo, hi = bootstrap_ci(ex_stat, fr[loss], tf[loss], n_boot=n_boot, seed=seed)
            acc = accumulated_error(fr[loss], tf[loss])
            ex[loss] = {
                "ex_acc_err": est.tolist(),
                "lo": lo.tolist(),
                "hi": hi.tolist(),
                **{k: acc[k].tolist() for k in ("R", "l_eps", "acc_err")},
            }
        # The same decoding applied to the oracle (when it is a model the decoder can run): the error
        # of the model's roll-in against the roll-in a perfect model would make with this decoding,
        # which removes the shift that the decoding strategy itself causes.
        oracle_model = getattr(oracle, "model", None) if getattr(oracle, "temperature", None) == 1.0 else None
        ex_vs_of, of_curves = None, None
        if oracle_model is not None:
            ofree = rollout(oracle_model, prompts, length=gen, decoding=dec, seed=seed * 1000 + 500 + i)
            orl = {k: v[:, p:] for k, v in losses_along(oracle, scorer, ofree, dec).items()}
            ex_vs_of = {}
            for loss in ex_losses:
                est, lo, hi = bootstrap_ci(ex_stat, fr[loss], orl[loss], n_boot=n_boot, seed=seed)
                ex_vs_of[loss] = {"ex_acc_err": est.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}
            of_curves = {k: v.mean(0).tolist() for k, v in orl.items()}
        ebc = {}
        for f in ("tv", "js"):
            with np.errstate(divide="ignore", invalid="ignore"):
                ebc[f] = (fr[f].mean(0) / tf_anc[f][:, p:].mean(0)).tolist()
        o_lp = np.asarray(oracle.log_probs(free[:, :-1]))[:, p:]  # [R, gen, V]
        result["decodings"][dec.name] = {
            "decoding": dataclasses.asdict(dec),
            "ex": ex,  # per loss: ExAccErr(l) with bootstrap CI (lo, hi), R(l), l*eps(l), AccErr(l)
            "ex_vs_oracle_decoded": ex_vs_of,  # eps from the oracle's own roll-in with this decoding (None: n/a)
            "oracle_decoded": of_curves,
            "free_running": {k: v.mean(0).tolist() for k, v in fr.items()},
            "teacher_forced": {k: v.mean(0).tolist() for k, v in tf.items()},
            "eb_c": ebc,
            "nll_oracle": float(fr["oracle_nll"].mean()),
            # The same number from the sampled tokens themselves (no Rao-Blackwellisation), as a cross-check.
            "nll_oracle_sampled": float(-np.take_along_axis(o_lp, free[:, p + 1 :, None], -1).mean()),
            # Sequence-level reverse KL per token needs roll-ins from m itself (ancestral decoding).
            "reverse_kl_per_token": float(fr["reverse_kl"].mean()) if dec.is_ancestral else None,
            "repetition": repetition_rates(free[:, p + 1 :]),
            # A grammar oracle can say whether each roll-out is a valid string at all.
            "valid_rate": float(np.mean(oracle.is_valid(free))) if hasattr(oracle, "is_valid") else None,
        }
    return result
