"""The exposure-bias study runner: a grid of training methods x seeds x decoding strategies on an oracle
(or on text, scored by a model the user names), trained, evaluated and written up as a report folder.

``run_study(cfg, out_dir)`` writes ``out_dir/report.md`` (tables of mean +/- 95% CI over seeds),
``out_dir/*.png`` (ExAccErr vs length per decoding and method, per-position KL teacher-forced vs
free-running, scheduled vs realised mixing rate, NLL-oracle vs NLL-test) and ``out_dir/results.json``
(every number, per run). The config is a frozen, strict dataclass read from YAML: an unknown key
is an error naming the known ones. ``arjax study CONFIG --out DIR`` (``cli_study``) calls it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from arjax.train import exposure
from arjax.train.exposure import Decoding, mean_ci

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class OracleSpec:
    """Where the data and the exact conditionals come from.

    kind: ``transformer`` (random weights: ``n_layers``, ``n_heads``, ``d_model``, ``init_std``,
    ``temperature``), ``hmm`` (``n_states``, ``concentration``), ``dyck`` (``n_types``, ``max_depth``,
    ``p_open``, ``noise``) or ``scorer`` (real text: ``scorer`` is the run directory of a model
    trained with ``arjax train``, ``text`` the corpus file; the scorer stands in for the oracle).
    """

    kind: str = "transformer"
    seed: int = 0
    vocab_size: int = 32
    n_layers: int = 2
    n_heads: int = 2
    d_model: int = 32
    init_std: float = 0.4
    temperature: float = 1.0
    n_states: int = 16
    concentration: float = 0.3
    n_types: int = 2
    max_depth: int = 8
    p_open: float = 0.5
    noise: float = 0.01
    scorer: str = ""
    text: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
    length: int = 32  # tokens generated after BOS (sequences are length + 1 long)
    n_train: int = 2048
    n_test: int = 512
    seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec:
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    log_every: int = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """A training method: teacher forcing (no ``scheduled_sampling``) or scheduled sampling.

    ``scheduled_sampling``: keys of ``ScheduledSamplingConfig`` (method, feed, num_passes, ...);
    ``schedule``: the gold probability over training steps, ``{kind, k, c, eps_min}`` as in
    ``arjax.train.schedules.make_schedule``; ``position_schedule`` optionally decays it over positions.
    """

    name: str
    scheduled_sampling: dict | None = None
    schedule: dict | None = None
    position_schedule: dict | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    n_rollouts: int = 512
    prompt_len: int = 8  # oracle tokens after BOS that prompt every roll-out (greedy needs diverse prompts)
    n_boot: int = 200
    # Per-step losses for ExAccErr (definitions in arjax.train.exposure); the first is the headline.
    ex_losses: tuple[str, ...] = ("regret", "kl", "oracle_nll")
    include_oracle: bool = True  # also evaluate the oracle itself as a model (the decoding-only baseline)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    name: str
    oracle: OracleSpec = dataclasses.field(default_factory=OracleSpec)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    model: dict = dataclasses.field(default_factory=lambda: {"n_layers": 2, "n_heads": 2, "d_model": 32})
    train: TrainSpec = dataclasses.field(default_factory=TrainSpec)
    methods: tuple[MethodSpec, ...] = (MethodSpec(name="teacher_forcing"),)
    seeds: tuple[int, ...] = (0, 1, 2)
    decodings: tuple[Decoding, ...] = (Decoding(name="greedy", temperature=0.0), Decoding(name="ancestral"))
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)

    def __post_init__(self):
        if not self.methods or not self.seeds or not self.decodings:
            raise ValueError("a study needs at least one method, one seed and one decoding")
        for what, items in (("method", self.methods), ("decoding", self.decodings)):
            names = [m.name for m in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        if self.oracle.kind not in ("transformer", "hmm", "dyck", "scorer"):
            raise ValueError(f"oracle.kind={self.oracle.kind!r}; choose one of transformer, hmm, dyck, scorer")
        if self.oracle.kind == "scorer" and not (self.oracle.scorer and self.oracle.text):
            raise ValueError("oracle.kind='scorer' needs oracle.scorer (an `arjax train` run dir) and oracle.text (a corpus file)")
        bad = [x for x in self.eval.ex_losses if x not in exposure.STEP_LOSSES]
        if bad or not self.eval.ex_losses:
            raise ValueError(f"eval.ex_losses={list(self.eval.ex_losses)}: choose from {exposure.STEP_LOSSES}")
        for name in ("length", "n_train", "n_test"):
            if getattr(self.data, name) <= 0:
                raise ValueError(f"data.{name}={getattr(self.data, name)} must be positive")
        if not 0 <= self.eval.prompt_len < self.data.length:
            raise ValueError(f"eval.prompt_len={self.eval.prompt_len} must be in [0, data.length={self.data.length})")
        if self.train.steps <= 0 or self.train.batch_size <= 0:
            raise ValueError(f"train.steps={self.train.steps} and train.batch_size={self.train.batch_size} must be positive")
        # Everything that would otherwise fail after minutes of sampling and training is checked now.
        for i, m in enumerate(self.methods):
            if m.scheduled_sampling is None and (m.schedule or m.position_schedule):
                raise ValueError(
                    f"methods[{i}] ({m.name!r}) has a schedule but no scheduled_sampling; add scheduled_sampling: {{}} "
                    "(defaults) or remove the schedule"
                )
            if m.scheduled_sampling is not None:
                try:
                    _ss_config(m)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"methods[{i}] ({m.name!r}): {e}") from None
        _model_config(self, self.oracle.vocab_size)


def _strict(cls, value, where: str):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors naming the path."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} keys, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; known keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in value.items():
        kwargs[k] = _convert(hints[k], v, f"{where}.{k}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def _convert(hint, v, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _strict(hint, v, where)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {v!r}")
        return tuple(_convert(item, x, f"{where}[{i}]") for i, x in enumerate(v))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None:
            return None
        return _convert(args[0], v, where)
    if hint is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(hint, type) and not isinstance(v, hint) or (hint in (int, float) and isinstance(v, bool)):
        raise ValueError(f"{where}={v!r} should be {hint.__name__}")
    return v


def study_from_dict(d: dict[str, Any]) -> StudyConfig:
    return _strict(StudyConfig, d, "study")


def load_study(path: str) -> StudyConfig:
    """A StudyConfig from YAML (strict)."""
    from arjax.train.config import _Loader  # YAML 1.2 floats (1e-3), shared with the train config

    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ValueError(f"study config {path!r} does not exist; see docs/studies/ for examples") from None
    if not isinstance(d, dict):
        raise ValueError(f"study config {path!r} must hold a mapping, got {type(d).__name__}")
    try:
        return study_from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- sources


def build_source(cfg: StudyConfig):
    """(oracle, train_tokens [N, L+1], test_tokens [M, L+1]); train and test are drawn with different seeds."""
    from arjax.train import oracles

    o, d = cfg.oracle, cfg.data
    if o.kind == "scorer":
        return _text_source(cfg)
    if o.kind == "transformer":
        from arjax.model import ModelConfig

        mcfg = ModelConfig(
            vocab_size=o.vocab_size, max_len=d.length + 1, n_layers=o.n_layers, n_heads=o.n_heads, d_model=o.d_model
        )
        oracle = oracles.TransformerOracle.random(mcfg, seed=o.seed, init_std=o.init_std, temperature=o.temperature)
    elif o.kind == "hmm":
        oracle = oracles.HMMOracle(vocab_size=o.vocab_size, n_states=o.n_states, seed=o.seed, concentration=o.concentration)
    else:
        oracle = oracles.DyckOracle(n_types=o.n_types, max_depth=o.max_depth, p_open=o.p_open, noise=o.noise)
    chunk = min(256, d.n_train, d.n_test)  # one sampler shape for both sets
    train = oracles.make_dataset(oracle, seed=2 * d.seed, n=d.n_train, length=d.length, chunk=chunk)
    test = oracles.make_dataset(oracle, seed=2 * d.seed + 1, n=d.n_test, length=d.length, chunk=chunk)
    return oracle, train, test


def _text_source(cfg: StudyConfig):
    """Real text: windows of the corpus (tokenised by the scorer's tokenizer); the scorer is the stand-in oracle."""
    from arjax.train.checkpoint import load_model
    from arjax.train.data import read_text, tokenize_and_split
    from arjax.train.oracles import TransformerOracle

    scorer, tokenizer, _ = load_model(cfg.oracle.scorer)
    split = tokenize_and_split(read_text(cfg.oracle.text), tokenizer)
    n = cfg.data.length + 1
    rng = np.random.default_rng(cfg.data.seed)

    def windows(ids, count):
        if len(ids) < n + 1:
            raise ValueError(f"the corpus split has {len(ids)} tokens, fewer than data.length+2={n + 1}")
        starts = rng.integers(0, len(ids) - n, count)
        return np.stack([ids[s : s + n] for s in starts]).astype(np.int32)

    oracle = TransformerOracle(scorer, temperature=1.0, bos_id=0)
    return oracle, windows(split.train, cfg.data.n_train), windows(split.val, cfg.data.n_test)


# ----------------------------------------------------------------------------- training


def _model_config(cfg: StudyConfig, vocab_size: int):
    from arjax.model import ModelConfig

    base = {"vocab_size": vocab_size, "max_len": cfg.data.length + 1, "n_layers": 2, "n_heads": 2, "d_model": 32}
    unknown = sorted(set(cfg.model) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown keys {unknown} in study.model; keys are ModelConfig fields (vocab_size and max_len come from the oracle and data)")
    try:
        return ModelConfig(**{**base, **cfg.model})
    except (TypeError, ValueError) as e:
        raise ValueError(f"study.model: {e}") from None


def _ss_config(method: MethodSpec):
    from arjax.train.schedules import GoldSchedule, make_schedule
    from arjax.train.scheduled_sampling import from_dict

    step = make_schedule(**method.schedule) if method.schedule else make_schedule("constant", k=1.0)
    pos = make_schedule(**method.position_schedule) if method.position_schedule else None
    return from_dict({**(method.scheduled_sampling or {}), "schedule": GoldSchedule(step=step, position=pos)})


def train_one(cfg: StudyConfig, method: MethodSpec, seed: int, train_tokens: np.ndarray, vocab_size: int, log=print):
    """Train one model; returns (model, history) where history logs loss and (SS) scheduled/realised mixing."""
    from arjax.model import Transformer
    from arjax.train.optim import make_optimizer
    from arjax.train.step import make_train_step

    t = cfg.train
    model = Transformer(_model_config(cfg, vocab_size), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(
        params, lr=t.lr, warmup_steps=t.warmup_steps, decay_steps=t.steps, min_lr=t.min_lr, weight_decay=t.weight_decay
    )
    opt_state = tx.init(params)
    ss = method.scheduled_sampling is not None
    if ss:
        from arjax.train.scheduled_sampling import make_ss_train_step

        step_fn = make_ss_train_step(graphdef, tx, _ss_config(method), seed=seed)
    else:
        step_fn = make_train_step(graphdef, tx, seed=seed, use_dropout=False)
    rng = np.random.default_rng(1000 + seed)
    history = {"step": [], "loss": [], "gold_prob": [], "mix_rate": []}
    t0 = time.time()
    for i in range(t.steps):
        idx = rng.integers(0, len(train_tokens), t.batch_size)
        batch = jnp.asarray(train_tokens[idx][None])  # [1, B, L+1]
        params, opt_state, m = step_fn(params, opt_state, batch, i)
        if i % t.log_every == 0 or i == t.steps - 1:
            history["step"].append(i)
            history["loss"].append(float(m["loss"]))
            history["gold_prob"].append(float(m["gold_prob"]) if ss else 1.0)
            history["mix_rate"].append(float(m["mix_rate"]) if ss else 0.0)
    log(f"  trained {method.name} seed={seed}: loss {history['loss'][-1]:.3f} in {time.time() - t0:.0f}s")
    return nnx.merge(graphdef, params), history


# ----------------------------------------------------------------------------- the study


def run_study(cfg: StudyConfig, out_dir: str, *, log=print) -> dict:
    """Train and evaluate the whole grid, then write results.json, the plots and report.md into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    oracle, train_tokens, test_tokens = build_source(cfg)
    from arjax.train.oracles import entropy_rate

    H = entropy_rate(oracle, test_tokens)
    log(f"{cfg.name}: oracle {cfg.oracle.kind}, entropy {H:.3f} nats/token, {len(train_tokens)} train / {len(test_tokens)} test sequences")
    ev = cfg.eval
    runs = []
    if ev.include_oracle and cfg.oracle.kind == "transformer" and cfg.oracle.temperature == 1.0:
        # The oracle decoded by each strategy: how much "excess error" decoding alone produces.
        res = exposure.evaluate(oracle.model, oracle, test_tokens, cfg.decodings, n_rollouts=ev.n_rollouts, prompt_len=ev.prompt_len, seed=0, n_boot=ev.n_boot, ex_losses=ev.ex_losses)
        runs.append({"method": "oracle", "seed": 0, "history": None, "eval": res})
    for method in cfg.methods:
        for seed in cfg.seeds:
            model, history = train_one(cfg, method, seed, train_tokens, oracle.vocab_size, log=log)
            res = exposure.evaluate(model, oracle, test_tokens, cfg.decodings, n_rollouts=ev.n_rollouts, prompt_len=ev.prompt_len, seed=seed, n_boot=ev.n_boot, ex_losses=ev.ex_losses)
            runs.append({"method": method.name, "seed": seed, "history": history, "eval": res})
            log(f"  evaluated {method.name} seed={seed}: NLL-test {res['nll_test']:.3f}, "
                + ", ".join(f"ExAccErr[{d}]@{res['length']} {r['ex'][ev.ex_losses[0]]['ex_acc_err'][-1]:+.1f}%" for d, r in res["decodings"].items()))
    summary = summarise(cfg, runs)
    results = {
        "config": _jsonable(dataclasses.asdict(cfg)),
        "oracle_entropy_per_token": H,
        "seconds": time.time() - t0,
        "jax_backend": jax.default_backend(),
        "summary": summary,
        "runs": runs,
    }
    write_report(cfg, results, out_dir)
    log(f"wrote {out_dir}/report.md, results.json and plots in {time.time() - t0:.0f}s")
    return results


def write_report(cfg: StudyConfig, results: dict, out_dir: str) -> None:
    """results.json (compact, 5 significant digits: the report folder stays small), the plots and report.md."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(_jsonable(results), f, separators=(",", ":"))
    plots = make_plots(cfg, results["runs"], results["summary"], out_dir)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_report(cfg, results, plots))


def rerender(out_dir: str) -> None:
    """Recompute the summary, plots and report.md from an existing ``results.json`` (no training)."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    cfg = study_from_dict(results["config"])
    results["summary"] = summarise(cfg, results["runs"])
    write_report(cfg, results, out_dir)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(f"{float(x):.5g}")
    if isinstance(x, np.integer):
        return int(x)
    return x


# ----------------------------------------------------------------------------- summary


def _curve_ci(curves: list) -> dict:
    """Per-position mean and 95% half-width over seeds of equally long curves."""
    a = np.asarray([[np.nan if v is None else v for v in c] for c in curves], np.float64)  # [S, L]
    stats = [mean_ci(a[:, j]) for j in range(a.shape[1])]
    return {"mean": [s[0] for s in stats], "ci": [s[1] for s in stats]}


def _masked(e: dict) -> dict:
    """ExAccErr curve with None where eps(l) is (numerically) zero: the ratio is undefined there."""
    curve = [
        x if (x is not None and le is not None and abs(le) > exposure.DEGENERATE * (i + 1)) else None
        for i, (x, le) in enumerate(zip(e["ex_acc_err"], e["l_eps"]))
    ]
    return {**e, "ex_acc_err": curve}


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")  # TV ratios are 0/0 for the oracle itself


def summarise(cfg: StudyConfig, runs: list) -> dict:
    """Means and 95% CIs over seeds for every method (x decoding), and CI-checked comparisons."""
    L = cfg.data.length - cfg.eval.prompt_len  # generated positions
    quarter = max(1, L // 4)
    out = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        rs = [r["eval"] for r in runs if r["method"] == name]
        s = {
            "n_seeds": len(rs),
            "nll_test": mean_ci([r["nll_test"] for r in rs]),
            "forward_kl_per_token": mean_ci([r["forward_kl_per_token"] for r in rs]),
            "kl_teacher_forced": _curve_ci([r["teacher_forced"]["kl"] for r in rs]),
            "decodings": {},
        }
        for dec in cfg.decodings:
            ds = [r["decodings"][dec.name] for r in rs]
            ex = {}
            for loss in cfg.eval.ex_losses:
                e = [_masked(d["ex"][loss]) for d in ds]
                ex_L = np.asarray([x["ex_acc_err"][-1] for x in e], np.float64)
                ex_q = np.asarray([x["ex_acc_err"][quarter - 1] for x in e], np.float64)
                # Mean per-position gap between the free-running and the teacher-forced loss.
                gap = [np.mean(np.asarray(d["free_running"][loss]) - np.asarray(d["teacher_forced"][loss])) for d in ds]
                # Against the oracle decoded alike; undefined wherever the ordinary ExAccErr is (a vanishing loss).
                vs = [d["ex_vs_oracle_decoded"] for d in ds]
                vs = [{loss: {"ex_acc_err": [a if b is not None else None for a, b in zip(v[loss]["ex_acc_err"], x["ex_acc_err"])]}}
                      for v, x in zip(vs, e)] if vs[0] else vs
                at_L_vs = mean_ci([v[loss]["ex_acc_err"][-1] for v in vs]) if vs[0] else None
                ex[loss] = {
                    "at_L_vs_oracle_decoded": at_L_vs,
                    "curve_vs_oracle_decoded": _curve_ci([v[loss]["ex_acc_err"] for v in vs]) if vs[0] else None,
                    "curve": _curve_ci([x["ex_acc_err"] for x in e]),
                    "at_L": mean_ci(ex_L),
                    "at_quarter": mean_ci(ex_q),
                    "growth": mean_ci(ex_L - ex_q),
                    "gap": mean_ci(gap),
                }
            s["decodings"][dec.name] = {
                "ex": ex,
                "nll_oracle": mean_ci([d["nll_oracle"] for d in ds]),
                "kl_free_running": _curve_ci([d["free_running"]["kl"] for d in ds]),
                "eb_c_tv_at_end": mean_ci([_nanmean(d["eb_c"]["tv"][-quarter:]) for d in ds]),
                "reverse_kl_per_token": mean_ci([d["reverse_kl_per_token"] for d in ds]) if ds[0]["reverse_kl_per_token"] is not None else None,
                "seq_rep_2": mean_ci([d["repetition"]["seq_rep_2"] for d in ds]),
                "rep_4": mean_ci([d["repetition"]["rep_4"] for d in ds]),
                "valid_rate": mean_ci([d["valid_rate"] for d in ds]) if ds[0].get("valid_rate") is not None else None,
                # Per-position top-1 agreement with the oracle, averaged over positions, on each roll-in.
                "agree_teacher_forced": mean_ci([np.mean(d["teacher_forced"]["agree"]) for d in ds]),
                "agree_free_running": mean_ci([np.mean(d["free_running"]["agree"]) for d in ds]),
                "quarter": quarter,
            }
        out[name] = s
    # Scheduled sampling vs teacher forcing, paired by seed: difference in the free-running gap.
    tf = cfg.methods[0].name
    comparisons = {}
    for m in cfg.methods[1:]:
        for dec in cfg.decodings:
            pairs = []
            for seed in cfg.seeds:
                a = next(r["eval"]["decodings"][dec.name] for r in runs if r["method"] == tf and r["seed"] == seed)
                b = next(r["eval"]["decodings"][dec.name] for r in runs if r["method"] == m.name and r["seed"] == seed)
                pairs.append((a, b))
            for loss in cfg.eval.ex_losses:
                comparisons[f"{m.name} - {tf} [{dec.name}, {loss}]"] = {
                    "ex_acc_err_at_L": mean_ci([b["ex"][loss]["ex_acc_err"][-1] - a["ex"][loss]["ex_acc_err"][-1] for a, b in pairs]),
                    "R_at_L": mean_ci([b["ex"][loss]["R"][-1] - a["ex"][loss]["R"][-1] for a, b in pairs]),
                    "l_eps_at_L": mean_ci([b["ex"][loss]["l_eps"][-1] - a["ex"][loss]["l_eps"][-1] for a, b in pairs]),
                }
    return {"methods": out, "comparisons": comparisons}


# ----------------------------------------------------------------------------- plots


def make_plots(cfg: StudyConfig, runs: list, summary: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = cfg.data.length - cfg.eval.prompt_len
    ls = np.arange(1, L + 1)
    methods = summary["methods"]
    files = []

    def band(ax, curve, label, **kw):
        m, c = np.asarray(curve["mean"], float), np.asarray(curve["ci"], float)
        (line,) = ax.plot(ls, m, label=label, **kw)
        if np.isfinite(c).any():
            ax.fill_between(ls, m - c, m + c, color=line.get_color(), alpha=0.2)

    losses = cfg.eval.ex_losses
    fig, axes = plt.subplots(len(losses), len(cfg.decodings), figsize=(4.2 * len(cfg.decodings), 3.2 * len(losses)), squeeze=False)
    for row, loss in zip(axes, losses):
        for ax, dec in zip(row, cfg.decodings):
            for name, s in methods.items():
                band(ax, s["decodings"][dec.name]["ex"][loss]["curve"], name, ls="--" if name == "oracle" else "-")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(title=f"{dec.name}, loss {loss}", xlabel="generation length l", ylabel="ExAccErr(l) [%]")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "ex_acc_err.png"))

    first = next(s for n, s in methods.items() if n != "oracle")
    if first["decodings"][cfg.decodings[0].name]["ex"][losses[0]]["curve_vs_oracle_decoded"] is not None:
        fig, axes = plt.subplots(1, len(cfg.decodings), figsize=(4.2 * len(cfg.decodings), 3.2), squeeze=False)
        for ax, dec in zip(axes[0], cfg.decodings):
            for name, s in methods.items():
                if name != "oracle":
                    band(ax, s["decodings"][dec.name]["ex"][losses[0]]["curve_vs_oracle_decoded"], name)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(title=f"{dec.name}, loss {losses[0]}, vs oracle decoded alike", xlabel="generation length l", ylabel="ExAccErr(l) [%]")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, out_dir, "ex_acc_err_vs_oracle_decoded.png"))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    free_dec = next((d for d in cfg.decodings if d.is_ancestral), cfg.decodings[0])
    for name, s in methods.items():
        if name == "oracle":
            continue
        band(ax, s["kl_teacher_forced"], f"{name} teacher-forced")
        band(ax, s["decodings"][free_dec.name]["kl_free_running"], f"{name} free-running ({free_dec.name})", ls=":")
    ax.set(xlabel="generated position l (after the prompt)", ylabel="KL(o || m) per token [nats]", title="per-position KL")
    ax.legend(fontsize=6)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "kl_per_position.png"))

    ss_runs = [r for r in runs if r["history"] and any(g < 1.0 for g in r["history"]["gold_prob"])]
    if ss_runs:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for r in ss_runs:
            h = r["history"]
            (line,) = ax.plot(h["step"], 1 - np.asarray(h["gold_prob"]), label=f"{r['method']} s{r['seed']} scheduled")
            ax.plot(h["step"], h["mix_rate"], ls=":", color=line.get_color(), label=f"{r['method']} s{r['seed']} realised")
        ax.set(xlabel="training step", ylabel="fraction of inputs fed by the model", title="schedule vs realised mixing")
        ax.legend(fontsize=5)
        fig.tight_layout()
        files.append(_save(fig, out_dir, "mixing_rate.png"))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name in methods:
        rs = [r["eval"] for r in runs if r["method"] == name]
        for dec, marker in zip(cfg.decodings, "os^dv*"):
            ax.scatter([r["nll_test"] for r in rs], [r["decodings"][dec.name]["nll_oracle"] for r in rs], marker=marker, s=18,
                       label=f"{name} / {dec.name}")
    ax.set(xlabel="NLL-test (teacher-forced, nats/token)", ylabel="NLL-oracle of samples (nats/token)", title="NLL-oracle vs NLL-test")
    ax.legend(fontsize=6)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "nll_oracle_vs_nll_test.png"))
    return files


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(os.path.join(out_dir, name), dpi=80)
    plt.close(fig)
    return name


# ----------------------------------------------------------------------------- report


def _fmt(mc, digits=3, pct=False) -> str:
    if mc is None:
        return "-"
    m, h = mc
    if m is None or not math.isfinite(m):
        return "-"
    u = "%" if pct else ""
    if h is None or not math.isfinite(h):
        return f"{m:.{digits}f}{u}"
    return f"{m:.{digits}f} ± {h:.{digits}f}{u}"


def _verdict(mc) -> str:
    m, h = mc
    if not (math.isfinite(m) and math.isfinite(h)):
        return "undetermined (one run)"
    if m - h > 0:
        return "positive (95% CI excludes 0)"
    if m + h < 0:
        return "negative (95% CI excludes 0)"
    return "not distinguishable from 0 (95% CI includes 0)"


def render_report(cfg: StudyConfig, results: dict, plots: list[str]) -> str:
    s = results["summary"]
    L = cfg.data.length - cfg.eval.prompt_len
    lines = [
        f"# Exposure-bias study: {cfg.name}",
        "",
        f"Oracle: `{cfg.oracle.kind}` (entropy {results['oracle_entropy_per_token']:.3f} nats/token); "
        f"{cfg.data.n_train} training and {cfg.data.n_test} test sequences of {cfg.data.length} tokens; "
        f"free running continues a {cfg.eval.prompt_len}-token oracle prompt for l = 1..{L} tokens; "
        f"{len(cfg.seeds)} seeds x {len(cfg.methods)} methods x {len(cfg.decodings)} decodings; "
        f"{cfg.eval.n_rollouts} free-running roll-outs per model and decoding (jitted decoder); "
        f"ran in {results['seconds'] / 60:.1f} min on `{results['jax_backend']}`.",
        "",
        "Numbers are mean ± 95% CI half-width over seeds (Student t). ExAccErr(l) = (R(l) / (l eps(l)) - 1) x 100% "
        f"with per-step losses {', '.join(f'`{x}`' for x in cfg.eval.ex_losses)} (exact definitions in `arjax.train.exposure`: "
        "`regret` = oracle NLL of the decoder's token minus that of the oracle decoded the same way, zero for a perfect model; "
        "`kl` = KL(o||m) at the context, zero for a perfect model; `oracle_nll` = expected oracle NLL of the token the decoder "
        "emits, which also moves with how predictable the visited contexts are). \"vs oracle decoded alike\" replaces eps's "
        "oracle roll-in (oracle samples) by the oracle decoded with the same strategy, so that the shift caused by the "
        "decoding strategy itself is not counted as exposure bias. The `oracle` row decodes the oracle itself (one run, no CI): what decoding alone does with a perfect model.",
        "",
        "## Teacher-forced quality",
        "",
        "| method | NLL-test | forward KL / token |",
        "|---|---|---|",
    ]
    for name, m in s["methods"].items():
        lines.append(f"| {name} | {_fmt(m['nll_test'])} | {_fmt(m['forward_kl_per_token'])} |")
    first = next(iter(s["methods"].values()))
    q = first["decodings"][cfg.decodings[0].name]["quarter"]
    for dec in cfg.decodings:
        head = ["method"]
        for loss in cfg.eval.ex_losses:
            head += [f"ExAccErr@{q} [{loss}]", f"ExAccErr@{L} [{loss}]", f"growth {q}->{L} [{loss}]", f"free - TF per step [{loss}]",
                     f"ExAccErr@{L} vs oracle decoded alike [{loss}]"]
        head += ["top-1 agreement TF", "top-1 agreement free", "NLL-oracle", "EB-C (TV, last quarter)", "seq-rep-2", "rep-4", "valid roll-outs"]
        lines += ["", f"## Decoding `{dec.name}` (temperature {dec.temperature}, top-k {dec.top_k}, top-p {dec.top_p})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in s["methods"].items():
            d = m["decodings"][dec.name]
            row = [name]
            for loss in cfg.eval.ex_losses:
                e = d["ex"][loss]
                row += [_fmt(e["at_quarter"], 1, True), _fmt(e["at_L"], 1, True), _fmt(e["growth"], 1, True), _fmt(e["gap"]),
                        _fmt(e["at_L_vs_oracle_decoded"], 1, True)]
            row += [_fmt(d["agree_teacher_forced"]), _fmt(d["agree_free_running"]), _fmt(d["nll_oracle"]), _fmt(d["eb_c_tv_at_end"], 2), _fmt(d["seq_rep_2"]), _fmt(d["rep_4"]),
                    _fmt(d.get("valid_rate"))]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## What the numbers say (each statement is the sign of a 95% CI over seeds)", ""]
    for name, m in s["methods"].items():
        if name == "oracle":
            continue
        for dec in cfg.decodings:
            for loss in cfg.eval.ex_losses:
                e = m["decodings"][dec.name]["ex"][loss]
                lines.append(
                    f"- `{name}`, `{dec.name}`, loss `{loss}`: ExAccErr@{L} = {_fmt(e['at_L'], 1, True)} is {_verdict(e['at_L'])}; "
                    f"its growth from l={q} to l={L} ({_fmt(e['growth'], 1, True)}) is {_verdict(e['growth'])}."
                )
    for key, c in s["comparisons"].items():
        lines.append(
            f"- {key}, paired by seed: ΔExAccErr@{L} = {_fmt(c['ex_acc_err_at_L'], 1, True)}, {_verdict(c['ex_acc_err_at_L'])}; "
            f"ΔR({L}) (free running) = {_fmt(c['R_at_L'])}, {_verdict(c['R_at_L'])}; "
            f"Δ l·eps({L}) (teacher forced) = {_fmt(c['l_eps_at_L'])}, {_verdict(c['l_eps_at_L'])}."
        )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(_jsonable(dataclasses.asdict(cfg)), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
