"""Bad input, from the command line and from Python: exit status 2, no traceback, one line on stderr
naming the value."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from arjax.decode import SamplingParams, generate
from arjax.model import Transformer, get_config
from arjax.model.config import ModelConfig
from arjax.train.checkpoint import load_model
from arjax.train.config import TrainConfig, from_dict
from arjax.train.data import read_text
from arjax.train.exposure.scheduled_sampling import ScheduledSamplingConfig
from arjax.train.exposure.schedules import make_schedule
from arjax.train.exposure.study import study_from_dict

# Runs every case in ONE process (one JAX start-up, not 80) and captures each case's stderr at the
# file-descriptor level, so that anything at all (tracebacks, library logs) would be seen.
DRIVER = textwrap.dedent("""
    import json, os, sys, tempfile
    from arjax.train.cli import main

    cases = json.load(open(sys.argv[1]))
    results = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    for argv, _ in cases:
        with tempfile.TemporaryFile() as err:
            sys.stdout.flush(); sys.stderr.flush()
            saved_out, saved_err = os.dup(1), os.dup(2)
            os.dup2(devnull, 1); os.dup2(err.fileno(), 2)
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException as e:
                import traceback; traceback.print_exc(); code = "raised " + type(e).__name__
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os.dup2(saved_out, 1); os.dup2(saved_err, 2); os.close(saved_out); os.close(saved_err)
            err.seek(0)
            results.append({"argv": argv, "code": code, "stderr": err.read().decode("utf-8", "replace")})
    json.dump(results, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    f = {k: str(root / k) for k in ("run", "empty_dir", "full_dir", "out")}
    (root / "empty_dir").mkdir()
    (root / "full_dir").mkdir()
    (root / "full_dir" / "x.txt").write_text("x")
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    f["text"] = str(text)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 40)
    f["binary"] = str(root / "binary.bin")
    (root / "latin1.txt").write_bytes("café crème brûlée. ".encode("latin-1") * 200)
    f["latin1"] = str(root / "latin1.txt")
    (root / "empty.txt").write_text("")
    f["empty"] = str(root / "empty.txt")
    (root / "a_file").write_text("not a directory")
    f["file"] = str(root / "a_file")
    (root / "bad.yaml").write_text("steps: [\n")
    f["bad_yaml"] = str(root / "bad.yaml")
    study = {
        "name": "s",
        "oracle": {"kind": "dyck", "n_types": 1, "max_depth": 2},
        "data": {"length": 4, "n_train": 8, "n_test": 8},
        "model": {"n_layers": 1, "n_heads": 1, "d_model": 8},
        "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0},
        "seeds": [0],
        "decodings": [{"name": "g", "temperature": 0.0}],
        "eval": {"n_rollouts": 4, "prompt_len": 1, "n_boot": 2},
    }
    for name, change in {
        "study_ok": {},
        "study_path_name": {"name": "../../x"},
        "study_rollouts": {"eval": {"n_rollouts": 0}},
        "study_seeds": {"seeds": ["a"]},
        "study_ss_temp": {"methods": [{"name": "ss", "scheduled_sampling": {"temperature": -1}}]},
        "study_big_vocab": {"oracle": {"kind": "hmm", "vocab_size": 2**40}},
    }.items():
        (root / f"{name}.yaml").write_text(json.dumps({**study, **change}))
        f[name] = str(root / f"{name}.yaml")
    from arjax.train.cli import main

    assert (
        main(
            [
                "train",
                "--model",
                "tiny",
                "--data",
                f["text"],
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--set",
                "eval_iters=1",
                "--set",
                "model.n_layers=1",
                "--out",
                f["run"],
                "--quiet",
            ]
        )
        == 0
    )
    return f


def _cases(f):
    run, out = f["run"], f["out"]
    g = ["generate", "--ckpt", run, "--prompt", "the", "--max-new-tokens", "8"]
    return [
        # train: every number of the run config, the config file, the data, the run directory
        (["train", "--steps", "0"], "steps=0"),
        (["train", "--steps", "-5"], "steps=-5"),
        (["train", "--steps", "99999999999"], "99999999999"),
        (["train", "--steps", "ten"], "'ten'"),
        (["train", "--lr", "nan"], "lr=nan"),
        (["train", "--lr", "-1"], "lr=-1"),
        (["train", "--lr", "inf"], "lr=inf"),
        (["train", "--set", "grad_clip=-1"], "grad_clip=-1"),
        (["train", "--set", "beta1=5"], "beta1=5"),
        (["train", "--set", "beta2=1.0"], "beta2=1.0"),
        (["train", "--weight-decay", "-1"], "weight_decay=-1"),
        (["train", "--set", "lr_decay_steps=-5"], "lr_decay_steps=-5"),
        (["train", "--batch-size", "0"], "batch_size=0"),
        (["train", "--seq-len", "0"], "seq_len=0"),
        (["train", "--accum-steps", "0"], "accum_steps=0"),
        (["train", "--warmup-steps", "-1"], "warmup_steps=-1"),
        (["train", "--min-lr", "1"], "min_lr=1"),
        (["train", "--set", "val_fraction=1.5"], "val_fraction=1.5"),
        (["train", "--set", "eval_iters=0"], "eval_iters=0"),
        (["train", "--set", "max_to_keep=0"], "max_to_keep=0"),
        (["train", "--set", "seed=1.5"], "seed=1.5"),
        (["train", "--set", "model.dropout=1.5"], "dropout=1.5"),
        (["train", "--set", "model.n_layers=0"], "n_layers=0"),
        (["train", "--set", "model.d_model=2.5"], "d_model=2.5"),
        (["train", "--set", "model.vocab_size=4294967296"], "4294967296"),
        (["train", "--model", "gpt5"], "gpt5"),
        (["train", "--tokenizer", "bpe"], "'bpe'"),
        (["train", "--set", "stepz=3"], "stepz"),
        (["train", "--set", "oops"], "oops"),
        (["train", "--set", "tokenizer=hf"], "hf"),
        (["train", "--set", "scheduled_sampling.feed=beam"], "beam"),
        (["train", "--set", "scheduled_sampling.temperature=0"], "temperature=0"),
        (
            [
                "train",
                "--set",
                "scheduled_sampling.schedule.step.kind=linear",
                "--set",
                "scheduled_sampling.schedule.step.c=-1",
            ],
            "c=-1",
        ),
        (
            [
                "train",
                "--set",
                "scheduled_sampling.schedule.step.k=.nan",
                "--set",
                "scheduled_sampling.schedule.step.kind=linear",
            ],
            "k=nan",
        ),
        (["train", "--set", "scheduled_sampling.schedule.step.k=0.5"], "['kind']"),
        (["train", "--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
        (["train", "--config", f["empty_dir"]], f["empty_dir"]),
        (["train", "--config", f["bad_yaml"]], f["bad_yaml"]),
        (["train", "--data", "/nonexistent/data.txt", "--out", out], "/nonexistent/data.txt"),
        (["train", "--data", f["binary"], "--out", out], f["binary"]),
        (["train", "--data", f["latin1"], "--out", out], f["latin1"]),
        (["train", "--data", f["empty"], "--out", out], f["empty"]),
        (["train", "--data", f["text"], "--out", f["file"]], f["file"]),
        (["train", "--data", f["text"], "--out", run], run),
        (["train", "--out", f["empty_dir"], "--resume"], f["empty_dir"]),
        (["train", "--out", run, "--resume", "--lr", "0.5"], "lr: checkpoint"),
        (["train", "--out", run, "--resume", "--steps", "1"], "steps=1"),
        (["train", "--model", "tiny", "--seq-len", "1000", "--data", f["text"], "--out", out], "seq_len=1000"),
        (["train", "--data", f["text"], "--out", ""], "--out"),
        # generate: every sampling number, prompts, stops, the checkpoint
        (g + ["--top-k", "4294967301"], "4294967301"),
        (g + ["--top-k", "-1"], "top_k=-1"),
        (g + ["--top-k", "300"], "top_k=300"),
        (g + ["--top-p", "0"], "top_p=0"),
        (g + ["--top-p", "1.5"], "top_p=1.5"),
        (g + ["--min-p", "2"], "min_p=2"),
        (g + ["--temperature", "-1"], "temperature=-1"),
        (g + ["--temperature", "inf"], "temperature=inf"),
        (g + ["--temperature", "nan"], "temperature=nan"),
        (g + ["--repetition-penalty", "inf"], "repetition_penalty=inf"),
        (g + ["--repetition-penalty", "0"], "repetition_penalty=0"),
        (["generate", "--ckpt", run, "--max-new-tokens", "0"], "max_new_tokens=0"),
        (["generate", "--ckpt", run, "--max-new-tokens", "100000"], "100000"),
        (g + ["--eos", "999"], "999"),
        (g + ["--chunk-steps", "0"], "chunk_steps=0"),
        (g + ["--stop", ""], "stop string '' is empty"),
        (g + ["--prompt-lookup", "--draft-k", "0"], "draft k=0 must be an int in 1..64"),
        (g + ["--prompt-lookup", "--ngram", "99"], "ngram=99 must be an int in 1..16"),
        (g + ["--prompt-lookup", "--draft-ckpt", run], "pass one of --draft-ckpt DIR"),
        (
            g + ["--draft-k", "-3"],
            "--draft-k and --ngram set speculative decoding; add --draft-ckpt DIR or --prompt-lookup",
        ),
        (g + ["--draft-ckpt", "/nonexistent/draft"], "/nonexistent/draft"),
        (g + ["--mesh", "model=3"], "needs 3 devices but 1 are available"),
        (["generate", "--ckpt", run, "--prompt", ""], "prompt 1"),
        (["generate", "--ckpt", "/nonexistent/run"], "/nonexistent/run"),
        (["generate"], "--ckpt"),
        (["generate", "--ckpt", run, "--hf", run], "--hf"),
        (["generate", "--hf", "/nonexistent/hf"], "/nonexistent/hf"),
        (["generate", "--ckpt", f["empty_dir"]], f["empty_dir"]),
        (["generate", "--ckpt", f["file"]], f"{f['file']!r} is a file, not a run directory"),
        # eval and checkpoints
        (["eval", "--ckpt", run, "--batch-size", "0"], "--batch-size 0"),
        (["eval", "--ckpt", run, "--iters", "-3"], "--iters -3"),
        (["eval", "--ckpt", run, "--data", "/nonexistent/eval.txt"], "/nonexistent/eval.txt"),
        (["eval", "--ckpt", run, "--data", f["binary"]], f["binary"]),
        (["eval", "--ckpt", "/nonexistent/run"], "/nonexistent/run"),
        (["checkpoints", "/nonexistent/run"], "/nonexistent/run"),
        (["checkpoints", f["empty_dir"]], f["empty_dir"]),
        (["checkpoints", f["file"]], f"{f['file']!r} is a file, not a run directory"),
        (["eval", "--ckpt", f["file"]], f"{f['file']!r} is a file, not a run directory"),
        # convert and tokenizer
        (["convert", "--from-hf", "/nonexistent/hf", "--out", out], "/nonexistent/hf"),
        (["convert", "--from-hf", run, "--out", out], "config.json"),
        (["convert", "--to-hf", run, "--out", f["file"]], f["file"]),
        (["convert", "--to-hf", run, "--out", f["full_dir"]], f["full_dir"]),
        (["convert", "--to-hf", "/nonexistent/run", "--out", out], "/nonexistent/run"),
        (["convert", "--to-hf", run], "--out"),
        (["convert", "--from-hf", run, "--to-hf", run, "--out", out], "--from-hf"),
        (["tokenizer", "train", "--data", "/nonexistent/corpus.txt", "--vocab-size", "300"], "/nonexistent/corpus.txt"),
        (["tokenizer", "train", "--data", f["text"], "--vocab-size", "10"], "vocab_size=10"),
        (
            ["tokenizer", "train", "--data", f["empty_dir"], "--vocab-size", "300"],
            "is a directory; pass a UTF-8 text file",
        ),
        (["tokenizer", "train", "--data", f["text"], "--vocab-size", "ten"], "'ten'"),
        # study
        (["study", "/nonexistent/study.yaml"], "/nonexistent/study.yaml"),
        (["study", f["study_path_name"]], "../../x"),
        (["study", f["study_rollouts"]], "n_rollouts=0"),
        (["study", f["study_seeds"]], "'a'"),
        (["study", f["study_ss_temp"]], "temperature=-1"),
        (["study", f["study_big_vocab"]], str(2**40)),
        (["study", f["study_ok"], "--out", f["empty_dir"], "--resume"], f["empty_dir"]),
        # the command line itself
        ([], "COMMAND"),
        (["fly"], "'fly'"),
        (["train", "--tokens", "3"], "--tokens"),
    ]


def test_bad_command_lines_exit_2_with_one_line_naming_the_value(files, tmp_path, subprocess_env):
    cases = _cases(files)
    assert len(cases) >= 60
    assert len({json.dumps(argv) for argv, _ in cases}) == len(cases), "cases must be distinct"
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=subprocess_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    problems = []
    for (argv, needle), r in zip(cases, results):
        lines = r["stderr"].strip().splitlines()
        if r["code"] != 2 or len(lines) != 1 or "Traceback" in r["stderr"] or needle not in lines[0]:
            problems.append(
                f"{argv}: code {r['code']}, stderr {r['stderr'][-400:]!r} (wanted one line naming {needle!r})"
            )
    assert not problems, "\n".join(problems)
    assert not os.path.exists(files["out"]), "no bad command may leave a run behind"
    assert sorted(os.listdir(tmp_path)) == ["cases.json", "driver.py", "out.json"], (
        "nothing written in the working directory"
    )


def _size_cases(f, demo, hf_big):
    """Numbers that fit 32 bits but not the machine: each refused before anything is allocated."""
    return [
        (["train", "--batch-size", "1000000000", "--out", f["out"]], "batch_size=1000000000"),
        (["train", "--batch-size", "2147483647", "--out", f["out"]], "batch_size=2147483647"),
        (["train", "--set", "model.vocab_size=2147483647", "--out", f["out"]], "vocab_size=2147483647"),
        (["train", "--set", "model.max_len=2147483647", "--out", f["out"]], "max_len=2147483647"),
        (["train", "--set", "model.max_len=2147483647", "--seq-len", "64", "--out", f["out"]], "max_len=2147483647"),
        (["train", "--accum-steps", "2147483647", "--out", f["out"]], "accum_steps=2147483647"),
        (["train", "--set", "model.n_layers=2147483647", "--out", f["out"]], "n_layers=2147483647"),
        (["train", "--set", "eval_iters=2147483647", "--out", f["out"]], "eval_iters=2147483647"),
        (["eval", "--ckpt", f["run"], "--batch-size", "2147483647"], "--batch-size 2147483647"),
        (["eval", "--ckpt", f["run"], "--iters", "2147483647"], "--iters 2147483647"),
        (
            ["tokenizer", "train", "--data", f["text"], "--vocab-size", "1000000000", "--out", f["out"]],
            "vocab_size=1000000000",
        ),
        (["generate", "--hf", hf_big, "--prompt", "a"], "vocab_size=1000000000"),
        (["convert", "--from-hf", hf_big, "--out", f["out"]], "vocab_size=1000000000"),
        (["serve", "--ckpt", demo, "--slots", "65536", "--port", "0"], "slots=65536"),
        (
            ["generate", "--ckpt", demo, "--input", f["prompts"], "--output", f["out"], "--slots", "65536"],
            "slots=65536",
        ),
    ]


@pytest.mark.slow
def test_sizes_the_machine_cannot_hold_are_refused_in_one_line_before_allocating(files, tmp_path, subprocess_env):
    """Run under ``ulimit -v`` (3 GiB): an estimate that came too late would be an allocation failure
    (a traceback or an abort) here, not a one-line refusal, and could not take the machine down."""
    from transformers import GPT2Config

    from arjax.train.cli import main

    demo = str(tmp_path / "demo")  # the `make demo` preset: a 32 GiB cache at 65536 slots
    assert (
        main(
            [
                "train",
                "--config",
                "tpu_configs/cpu-demo.yaml",
                "--data",
                files["text"],
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--set",
                "eval_iters=1",
                "--out",
                demo,
                "--quiet",
            ]
        )
        == 0
    )
    hf_big = tmp_path / "hf_big"  # a config.json that claims a billion tokens
    GPT2Config(vocab_size=10**9, n_positions=64, n_embd=32, n_layer=2, n_head=2).save_pretrained(hf_big)
    files = {**files, "prompts": str(tmp_path / "prompts.jsonl")}
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "the"}\n')
    cases = _size_cases(files, demo, str(hf_big))
    work = tmp_path / "work"
    work.mkdir()
    (work / "cases.json").write_text(json.dumps(cases))
    (work / "driver.py").write_text(DRIVER)

    command = f"ulimit -v {3 * 2**20} && exec {sys.executable} driver.py cases.json out.json"  # KiB
    proc = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=600, cwd=work, env=subprocess_env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    problems = []
    for (argv, needle), r in zip(cases, json.loads((work / "out.json").read_text())):
        lines = r["stderr"].strip().splitlines()
        if (
            r["code"] != 2
            or len(lines) != 1
            or "Traceback" in r["stderr"]
            or needle not in lines[0]
            or "at least" not in lines[0]
            or "has 3.0 GiB" not in lines[0]
        ):
            problems.append(
                f"{argv}: code {r['code']}, stderr {r['stderr'][-400:]!r} (wanted one line naming {needle!r})"
            )
    assert not problems, "\n".join(problems)
    assert not os.path.exists(files["out"]), "a refused command leaves nothing behind"


def test_the_console_script_itself(files, subprocess_env):
    """A few of the cases through the installed `arjax` entry point, each its own process."""
    exe = os.path.join(os.path.dirname(sys.executable), "arjax")
    for argv, needle in [
        (["train", "--lr", "nan"], "lr=nan"),
        (["generate", "--ckpt", files["run"], "--top-k", "-1"], "top_k=-1"),
        (["train", "--steps", "ten"], "'ten'"),
    ]:
        proc = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120, env=subprocess_env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, (argv, proc.stderr)


def test_a_seed_of_any_size_works(files, capsys):
    from arjax.train.cli import main

    for seed in (2**70, -(2**40)):
        assert (
            main(["generate", "--ckpt", files["run"], "--prompt", "the", "--max-new-tokens", "3", "--seed", str(seed)])
            == 0
        )


# ----------------------------------------------------------------------------- the Python API


def _model():
    return Transformer(get_config("tiny"), rngs=nnx.Rngs(0))


API = [
    (lambda: TrainConfig(lr=float("nan")), "lr=nan"),
    (lambda: TrainConfig(grad_clip=-1.0), "grad_clip=-1.0"),
    (lambda: TrainConfig(beta1=5.0), "beta1=5.0"),
    (lambda: TrainConfig(weight_decay=-1.0), "weight_decay=-1.0"),
    (lambda: TrainConfig(lr_decay_steps=-5), "lr_decay_steps=-5"),
    (lambda: TrainConfig(steps=2**40), str(2**40)),
    (lambda: TrainConfig(val_fraction=1.0), "val_fraction=1.0"),
    (lambda: TrainConfig(seed=True), "seed=True"),
    (lambda: from_dict({"scheduled_sampling": {"num_passes": 1}}), "num_passes=1"),
    (
        lambda: ModelConfig(vocab_size=10, max_len=8, n_layers=1, n_heads=1, d_model=8, norm_eps=math.inf),
        "norm_eps=inf",
    ),
    (lambda: get_config("tiny", dropout=-0.1), "dropout=-0.1"),
    (lambda: ScheduledSamplingConfig(temperature=math.nan), "temperature=nan"),
    (lambda: ScheduledSamplingConfig(pass1_weight=-1.0), "pass1_weight=-1.0"),
    (lambda: make_schedule("linear", k=math.inf), "k=inf"),
    (lambda: make_schedule("exponential", k=1.5), "k=1.5"),
    (lambda: SamplingParams.make(2, top_k=4294967301), "4294967301"),
    (lambda: SamplingParams.make(2, top_k=2**40), str(2**40)),
    (lambda: SamplingParams.make(2, temperature=math.inf), "temperature=inf"),
    (lambda: SamplingParams.make(2, repetition_penalty=math.inf), "repetition_penalty=inf"),
    (lambda: SamplingParams.make(2, top_p=[0.5, 0.0]), "top_p=0.0"),
    (lambda: SamplingParams.make(2, temperature="hot"), "temperature='hot'"),
    (lambda: generate(_model(), [[1, 2]], max_new_tokens=0), "max_new_tokens=0"),
    (lambda: generate(_model(), [[1, 2]], max_new_tokens=True), "max_new_tokens=True"),
    (lambda: generate(_model(), [[1, 2, 3]], max_new_tokens=4, max_len=2), "the prompt alone fills the cache"),
    (lambda: generate(_model(), [[1, 2]], max_new_tokens=4, seed=1.5), "seed=1.5"),
    (lambda: generate(_model(), [[1, 999]], max_new_tokens=4), "999"),
    (lambda: study_from_dict({"name": "../x"}), "../x"),
    (lambda: study_from_dict({"name": "x", "eval": {"n_rollouts": -1}}), "n_rollouts=-1"),
    (lambda: study_from_dict({"name": "x", "decodings": [{"name": "d", "top_p": 2.0}]}), "top_p=2.0"),
    (lambda: load_model("/nonexistent/run"), "/nonexistent/run"),
    (lambda: load_model(None), "run_dir=None is not a path"),
    (lambda: load_model(__file__), "is a file, not a run directory"),
]


@pytest.mark.parametrize("call, needle", API, ids=[n for _, n in API])
def test_bad_values_through_the_python_api_are_value_errors_naming_them(call, needle):
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_text_that_is_not_utf8_is_refused_unless_replacement_is_asked(files):
    with pytest.raises(ValueError, match=r"is not UTF-8 text: byte \d+ is 0x[0-9a-f]{2}"):
        read_text(files["latin1"])
    assert "\ufffd" in read_text(files["latin1"], errors="replace")
    assert np.isfinite(len(read_text(files["text"])))
