"""The exposure-bias study runner: a grid of training methods x seeds x decoding strategies on an oracle
(or on text, scored by a model the user names), trained through the one training loop, evaluated, and
written up as a report folder.

``run_study(cfg, out_dir)`` trains every (method, seed) with ``arjax.train.loop.fit`` into
``out_dir/runs/<method>/seed<k>/`` (checkpoints, ``metrics.jsonl``), evaluates it
(``arjax.train.exposure.metrics.evaluate``) and persists the result there (``result.json``), then
writes ``out_dir/report.md``, the plots and ``out_dir/results.json`` (``report``). With
``resume=True`` finished runs are read back, an interrupted one continues from its checkpoint,
and the report comes out as an uninterrupted study's. The config is a frozen, strict dataclass
read from YAML (``arjax.model.config.strict_from_dict``): an unknown key is an error naming the
known ones. ``arjax study CONFIG --out DIR [--resume]`` calls it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
import numpy as np

from arjax.model.config import ANY_INT, NON_NEGATIVE, POSITIVE, ModelConfig, bounds, check_field_types, strict_from_dict
from arjax.model.rng import numpy_rng
from arjax.train import loop
from arjax.train.checkpoint import latest_checkpoint, load_model
from arjax.train.config import TrainConfig, load_yaml
from arjax.train.config import from_dict as train_config_from_dict
from arjax.train.data import Rows, read_text, tokenize_and_split
from arjax.train.exposure import metrics, oracles
from arjax.train.exposure.metrics import Decoding
from arjax.train.exposure.report import jsonable, summarise, write_report
from arjax.train.exposure.scheduled_sampling import ScheduledSamplingConfig

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
    seed: int = dataclasses.field(default=0, metadata=ANY_INT)
    vocab_size: int = dataclasses.field(default=32, metadata=bounds(2))
    n_layers: int = dataclasses.field(default=2, metadata=POSITIVE)
    n_heads: int = dataclasses.field(default=2, metadata=POSITIVE)
    d_model: int = dataclasses.field(default=32, metadata=POSITIVE)
    init_std: float = dataclasses.field(default=0.4, metadata=POSITIVE)
    temperature: float = dataclasses.field(default=1.0, metadata=POSITIVE)
    n_states: int = dataclasses.field(default=16, metadata=POSITIVE)
    concentration: float = dataclasses.field(default=0.3, metadata=POSITIVE)
    n_types: int = dataclasses.field(default=2, metadata=POSITIVE)
    max_depth: int = dataclasses.field(default=8, metadata=POSITIVE)
    p_open: float = dataclasses.field(default=0.5, metadata=bounds(0, 1, lo_open=True, hi_open=True))
    noise: float = dataclasses.field(default=0.01, metadata=bounds(0, 1, hi_open=True))
    scorer: str = ""
    text: str = ""

    def __post_init__(self):
        check_field_types(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
    length: int = dataclasses.field(default=32, metadata=POSITIVE)  # tokens after BOS (sequences are length + 1 long)
    n_train: int = dataclasses.field(default=2048, metadata=POSITIVE)
    n_test: int = dataclasses.field(default=512, metadata=POSITIVE)
    seed: int = dataclasses.field(default=0, metadata=ANY_INT)

    def __post_init__(self):
        check_field_types(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """A training method: teacher forcing (no ``scheduled_sampling``) or scheduled sampling with
    the settings of a run config's ``scheduled_sampling:`` section (method, feed, coins, schedule)."""

    name: str
    scheduled_sampling: ScheduledSamplingConfig | None = None

    def __post_init__(self):
        check_field_types(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    n_rollouts: int = dataclasses.field(default=512, metadata=POSITIVE)
    # oracle tokens after BOS that prompt every roll-out (greedy needs diverse prompts)
    prompt_len: int = dataclasses.field(default=8, metadata=NON_NEGATIVE)
    n_boot: int = dataclasses.field(default=200, metadata=POSITIVE)
    # Per-step losses for ExAccErr (definitions in arjax.train.exposure.metrics); the first is the headline.
    ex_losses: tuple[str, ...] = ("regret", "kl", "oracle_nll")
    include_oracle: bool = True  # also evaluate the oracle itself as a model (the decoding-only baseline)

    def __post_init__(self):
        check_field_types(self)


# The study's training settings are TrainConfig keys; these defaults suit tiny oracle models.
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 500,
    "batch_size": 32,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 20,
    "weight_decay": 0.0,
    "log_interval": 10,
    "ckpt_interval": 250,
    "max_to_keep": 1,
}
# TrainConfig keys the study sets itself, from its other sections.
_STUDY_OWNED = {
    "model": "study.model",
    "model_overrides": "study.model",
    "data": "study.data and study.oracle",
    "tokenizer": "study.oracle",
    "tokenizer_path": "study.oracle",
    "val_fraction": "study.data.n_test",
    "seq_len": "study.data.length",
    "eval_iters": "study.data.n_test",
    "seed": "study.seeds",
    "scheduled_sampling": "study.methods",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    name: str
    oracle: OracleSpec = dataclasses.field(default_factory=OracleSpec)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    model: dict = dataclasses.field(default_factory=lambda: {"n_layers": 2, "n_heads": 2, "d_model": 32})
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig keys over TRAIN_DEFAULTS
    methods: tuple[MethodSpec, ...] = (MethodSpec(name="teacher_forcing"),)
    seeds: tuple[int, ...] = (0, 1, 2)
    decodings: tuple[Decoding, ...] = (Decoding(name="greedy", temperature=0.0), Decoding(name="ancestral"))
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)

    def __post_init__(self):
        check_field_types(self)
        for what, name in [("study name", self.name)] + [
            (f"methods[{i}].name", m.name) for i, m in enumerate(self.methods)
        ]:
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name in ("runs", "oracle"):
                raise ValueError(
                    f"{what}={name!r} must be a plain name (letters, digits, '.', '_', '-'; not 'runs' or 'oracle'): "
                    "it names a folder of the report"
                )
        if not self.methods or not self.seeds or not self.decodings:
            raise ValueError("a study needs at least one method, one seed and one decoding")
        for what, items in (("method", self.methods), ("decoding", self.decodings)):
            names = [m.name for m in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {list(self.seeds)}")
        if self.oracle.kind not in ("transformer", "hmm", "dyck", "scorer"):
            raise ValueError(f"oracle.kind={self.oracle.kind!r}; choose one of transformer, hmm, dyck, scorer")
        if self.oracle.kind == "scorer" and not (self.oracle.scorer and self.oracle.text):
            raise ValueError(
                "oracle.kind='scorer' needs oracle.scorer (an `arjax train` run dir) and oracle.text (a corpus file)"
            )
        bad = [x for x in self.eval.ex_losses if x not in metrics.STEP_LOSSES]
        if bad or not self.eval.ex_losses:
            raise ValueError(f"eval.ex_losses={list(self.eval.ex_losses)}: choose from {metrics.STEP_LOSSES}")
        if not 0 <= self.eval.prompt_len < self.data.length:
            raise ValueError(f"eval.prompt_len={self.eval.prompt_len} must be in [0, data.length={self.data.length})")
        # Everything that would otherwise fail after minutes of sampling and training is checked now.
        model_cfg = self.model_config(self.oracle.vocab_size)
        for m in self.methods:
            self.train_config(m, self.seeds[0], model_cfg=model_cfg)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The trained model: ``study.model`` keys (ModelConfig fields) over a 2-layer, width-32 default."""
        base = {"vocab_size": vocab_size, "max_len": self.data.length + 1, "n_layers": 2, "n_heads": 2, "d_model": 32}
        owned = sorted({"vocab_size", "max_len"} & set(self.model))
        if owned:
            raise ValueError(f"study.model sets {owned}, which come from the oracle and data.length; remove them")
        return strict_from_dict(ModelConfig, {**base, **self.model}, "study.model")

    def train_config(self, method: MethodSpec, seed: int, *, model_cfg: ModelConfig | None = None) -> TrainConfig:
        """The run config of one (method, seed): ``study.train`` over ``TRAIN_DEFAULTS``, plus the method."""
        owned = sorted(set(self.train) & set(_STUDY_OWNED))
        if owned:
            raise ValueError(f"study.train.{owned[0]} is set by {_STUDY_OWNED[owned[0]]}; remove it from study.train")
        d = {**TRAIN_DEFAULTS, **self.train}
        d.setdefault("eval_interval", d["steps"])  # one evaluation, at the end
        try:
            cfg = train_config_from_dict(
                {**d, "seed": seed, "scheduled_sampling": method.scheduled_sampling, "eval_iters": 1}
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"study.train: {e}") from None
        dropout = (model_cfg or self.model_config(self.oracle.vocab_size)).dropout
        ss = method.scheduled_sampling
        if ss is not None and dropout > 0 and ss.method == "sequential" and not ss.soft:
            raise ValueError(
                f"methods {method.name!r}: method 'sequential' with feed {ss.feed!r} has no dropout, but study.model "
                f"has dropout={dropout}; set it to 0 or use method 'parallel'"
            )
        return cfg


def study_from_dict(d: dict[str, Any]) -> StudyConfig:
    return strict_from_dict(StudyConfig, d, "study")


def load_study(path: str) -> StudyConfig:
    """A StudyConfig from YAML (strict)."""
    d = load_yaml(path, "study config", "docs/studies/")
    try:
        return study_from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- sources


def build_source(cfg: StudyConfig):
    """(oracle, train_tokens [N, L+1], test_tokens [M, L+1]); train and test are drawn with different seeds."""
    o, d = cfg.oracle, cfg.data
    if o.kind == "scorer":
        return _text_source(cfg)
    if o.kind == "transformer":
        mcfg = ModelConfig(
            vocab_size=o.vocab_size, max_len=d.length + 1, n_layers=o.n_layers, n_heads=o.n_heads, d_model=o.d_model
        )
        oracle = oracles.TransformerOracle.random(mcfg, seed=o.seed, init_std=o.init_std, temperature=o.temperature)
    elif o.kind == "hmm":
        oracle = oracles.HMMOracle(
            vocab_size=o.vocab_size, n_states=o.n_states, seed=o.seed, concentration=o.concentration
        )
    else:
        oracle = oracles.DyckOracle(n_types=o.n_types, max_depth=o.max_depth, p_open=o.p_open, noise=o.noise)
    chunk = min(256, d.n_train, d.n_test)  # one sampler shape for both sets
    train = oracles.make_dataset(oracle, seed=2 * d.seed, n=d.n_train, length=d.length, chunk=chunk)
    test = oracles.make_dataset(oracle, seed=2 * d.seed + 1, n=d.n_test, length=d.length, chunk=chunk)
    return oracle, train, test


def _text_source(cfg: StudyConfig):
    """Real text: windows of the corpus (tokenised by the scorer's tokenizer); the scorer is the stand-in oracle."""
    scorer, tokenizer, _ = load_model(cfg.oracle.scorer)
    split = tokenize_and_split(read_text(cfg.oracle.text), tokenizer)
    n = cfg.data.length + 1
    rng = numpy_rng(cfg.data.seed)

    def windows(ids, count):
        if len(ids) < n + 1:
            raise ValueError(f"the corpus split has {len(ids)} tokens, fewer than data.length+2={n + 1}")
        starts = rng.integers(0, len(ids) - n, count)
        return np.stack([ids[s : s + n] for s in starts]).astype(np.int32)

    oracle = oracles.TransformerOracle(scorer, temperature=1.0, bos_id=0)
    return oracle, windows(split.train, cfg.data.n_train), windows(split.val, cfg.data.n_test)


# ----------------------------------------------------------------------------- one run


def _history(run_dir: str, log_interval: int, steps: int) -> dict[str, list[float]]:
    """Loss and (scheduled sampling) scheduled / realised mixing every ``log_interval`` steps, from the run's log."""
    history: dict[str, list[float]] = {"step": [], "loss": [], "gold_prob": [], "mix_rate": []}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    for r in records:
        if "loss" not in r or not ((r["step"] - 1) % log_interval == 0 or r["step"] == steps):
            continue
        history["step"].append(r["step"] - 1)  # the 0-based update whose loss this is
        history["loss"].append(r["loss"])
        history["gold_prob"].append(r.get("gold_prob", 1.0))
        history["mix_rate"].append(r.get("mix_rate", 0.0))
    return history


def _write_json(path: str, obj) -> None:
    """Atomically: a study killed mid-write never leaves half a file behind."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def run_one(
    cfg: StudyConfig,
    method: MethodSpec,
    seed: int,
    oracle,
    train_tokens,
    test_tokens,
    run_dir: str,
    *,
    quiet: bool = True,
    log=print,
) -> dict:
    """Train (or finish training) and evaluate one (method, seed) in ``run_dir``; its result is persisted there."""
    done_path = os.path.join(run_dir, "result.json")
    if os.path.isfile(done_path):
        with open(done_path, encoding="utf-8") as f:
            result = json.load(f)
        log(f"  {method.name} seed={seed}: done earlier, read from {done_path}")
        return result
    model_cfg = cfg.model_config(oracle.vocab_size)
    tcfg = cfg.train_config(method, seed, model_cfg=model_cfg)
    ev = cfg.eval
    t0 = time.time()
    val = np.asarray(test_tokens[: min(len(test_tokens), 256)], np.int32)[None]  # [1, n, L+1]
    resume = latest_checkpoint(run_dir) is not None  # killed mid-training: continue from its checkpoint
    out = loop.fit(
        tcfg,
        run_dir,
        model_cfg=model_cfg,
        source=Rows(np.asarray(train_tokens, np.int32)),
        val_windows=val,
        resume=resume,
        quiet=quiet,
        label=f"{method.name} s{seed}",
    )
    history = _history(run_dir, tcfg.log_interval, tcfg.steps)
    log(f"  trained {method.name} seed={seed}: loss {history['loss'][-1]:.3f} in {time.time() - t0:.0f}s")
    res = metrics.evaluate(
        out["model"],
        oracle,
        test_tokens,
        cfg.decodings,
        n_rollouts=ev.n_rollouts,
        prompt_len=ev.prompt_len,
        seed=seed,
        n_boot=ev.n_boot,
        ex_losses=ev.ex_losses,
    )
    result = {"method": method.name, "seed": seed, "history": history, "eval": res}
    _write_json(done_path, result)
    return result


# ----------------------------------------------------------------------------- the study


def _check_out_dir(cfg: StudyConfig, out_dir: str, resume: bool) -> None:
    """A new study needs a fresh folder; a resumed one must have been run with the same config."""
    saved_path = os.path.join(out_dir, "study.json")
    current = jsonable(dataclasses.asdict(cfg))
    # A study that never started a run (e.g. its scorer path was wrong) may be started afresh.
    if os.path.isfile(saved_path) and os.path.isdir(os.path.join(out_dir, "runs")):
        if not resume:
            raise ValueError(f"{out_dir!r} already holds a study; pass --resume to continue it or choose a new --out")
        with open(saved_path, encoding="utf-8") as f:
            saved = json.load(f)
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            raise ValueError(
                f"the study in {out_dir!r} was run with a different config (differs in {diff}); resume it with "
                "the same config or choose a new --out"
            )
        return
    if resume and not os.path.isfile(saved_path):
        raise ValueError(f"--resume given but {out_dir!r} holds no study; drop --resume to start it")
    os.makedirs(out_dir, exist_ok=True)
    _write_json(saved_path, current)


def run_study(cfg: StudyConfig, out_dir: str, *, resume: bool = False, quiet: bool = True, log=print) -> dict:
    """Train and evaluate the whole grid, then write results.json, the plots and report.md into ``out_dir``.

    Every finished (method, seed) is persisted under ``out_dir/runs/``; with ``resume`` those are
    read back and an interrupted run continues from its last checkpoint.
    """
    _check_out_dir(cfg, out_dir, resume)
    t0 = time.time()
    oracle, train_tokens, test_tokens = build_source(cfg)
    H = oracles.entropy_rate(oracle, test_tokens)
    log(
        f"{cfg.name}: oracle {cfg.oracle.kind}, entropy {H:.3f} nats/token, "
        f"{len(train_tokens)} train / {len(test_tokens)} test sequences"
    )
    ev = cfg.eval
    runs = []
    if ev.include_oracle and cfg.oracle.kind == "transformer" and cfg.oracle.temperature == 1.0:
        # The oracle decoded by each strategy: how much "excess error" decoding alone produces.
        path = os.path.join(out_dir, "runs", "oracle", "result.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        else:
            res = metrics.evaluate(
                oracle.model,
                oracle,
                test_tokens,
                cfg.decodings,
                n_rollouts=ev.n_rollouts,
                prompt_len=ev.prompt_len,
                seed=0,
                n_boot=ev.n_boot,
                ex_losses=ev.ex_losses,
            )
            runs.append({"method": "oracle", "seed": 0, "history": None, "eval": res})
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_json(path, runs[-1])
    for method in cfg.methods:
        for seed in cfg.seeds:
            run_dir = os.path.join(out_dir, "runs", method.name, f"seed{seed}")
            r = run_one(cfg, method, seed, oracle, train_tokens, test_tokens, run_dir, quiet=quiet, log=log)
            res = r["eval"]
            log(
                f"  evaluated {method.name} seed={seed}: NLL-test {res['nll_test']:.3f}, "
                + ", ".join(
                    f"ExAccErr[{d}]@{res['length']} {x['ex'][ev.ex_losses[0]]['ex_acc_err'][-1]:+.1f}%"
                    for d, x in res["decodings"].items()
                )
            )
            runs.append(r)
    results = {
        "config": jsonable(dataclasses.asdict(cfg)),
        "oracle_entropy_per_token": H,
        "seconds": time.time() - t0,
        "jax_backend": jax.default_backend(),
        "summary": summarise(cfg, runs),
        "runs": runs,
    }
    write_report(cfg, results, out_dir)
    log(f"wrote {out_dir}/report.md, results.json and plots in {time.time() - t0:.0f}s")
    return results
