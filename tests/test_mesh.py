"""Meshes and sharded training, checkpoints and decoding, on fake CPU devices.

The mesh's errors are checked here, in process. Everything that needs several devices runs in
subprocesses (``tests/_mesh_checks.py``; the device count is fixed when JAX starts): 8 devices,
then a restore on 8 and on 1, and two processes of 2 devices joined by ``jax.distributed`` on
127.0.0.1 beside one process of 4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from arjax.model import get_config
from arjax.model.sharding import (
    PRESETS,
    check_batch_fits,
    check_model_fits,
    init_distributed,
    make_plan,
    mesh_shape,
    parse_mesh,
)
from arjax.train.cli import main
from arjax.train.config import TrainConfig

CHECKS = os.path.join(os.path.dirname(__file__), "_mesh_checks.py")


# ----------------------------------------------------------------------------- in process: parsing and errors


def test_mesh_parsing_and_resolution():
    assert parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert parse_mesh(" fsdp=-1 ") == {"fsdp": -1}
    assert mesh_shape({"data": -1, "model": 2}, 8) == (4, 1, 2)
    assert mesh_shape(None, 8) == (8, 1, 1)  # default: data-parallel over every device
    assert mesh_shape({"fsdp": 2, "model": 4}, 8) == (1, 2, 4)


@pytest.mark.parametrize(
    "text, match",
    [
        ("data", r"'data' is not AXIS=SIZE; write e.g. --mesh data=4,model=2"),
        ("data=four", r"is not AXIS=SIZE"),
        ("data=2,data=4", r"names 'data' twice"),
        ("batch=2", r"unknown axis 'batch'; the axes are data, fsdp, model"),
        ("data=0", r"data=0; use a whole number of devices >= 1, or -1"),
        ("data=-1,model=-1", r"-1 on more than one axis"),
        ("", r"names no axis"),
    ],
)
def test_bad_mesh_flags_are_one_line_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh(text)


@pytest.mark.parametrize(
    "spec, n, match",
    [
        (
            {"data": 4, "model": 2},
            4,
            r"mesh data=4 x fsdp=1 x model=2 needs 8 devices but 4 are available; make the product 4",
        ),
        ({"data": -1, "model": 3}, 8, r"the other axes take 3 devices, which does not divide the 8 available"),
    ],
)
def test_a_mesh_that_does_not_match_the_devices_is_refused(spec, n, match):
    with pytest.raises(ValueError, match=match):
        mesh_shape(spec, n)


@pytest.mark.parametrize(
    "overrides, sizes, match",
    [
        (
            {"n_heads": 6, "d_model": 48},
            {"model": 4},
            r"n_heads=6 does not split over model=4; choose model among the divisors of 6",
        ),
        (
            {"vocab_size": 65},
            {"model": 2},
            r"vocab_size=65 does not split over model=2; set model_overrides: \{vocab_size: 66\}",
        ),
        ({"d_model": 32, "d_ff": 90}, {"model": 4}, r"MLP width d_ff=90 does not split over model=4"),
        ({"d_model": 36, "n_heads": 4}, {"fsdp": 8}, r"d_model=36 does not split over fsdp=8"),
    ],
)
def test_a_model_that_does_not_split_over_the_mesh_is_refused(overrides, sizes, match):
    cfg = get_config("tiny", **overrides)
    with pytest.raises(ValueError, match=match):
        check_model_fits(cfg, sizes, PRESETS["fsdp_tp"])


def test_kv_heads_fewer_than_the_model_axis_are_replicated_not_refused():
    cfg = get_config("tiny", n_heads=4, n_kv_heads=2)
    check_model_fits(cfg, {"model": 4}, PRESETS["tp"])  # no error: the documented fallback


def test_batch_and_preset_errors_name_the_fix():
    with pytest.raises(
        ValueError,
        match=r"batch_size=6 does not split over data x fsdp = 4 x 2 = 8 devices; use a "
        r"batch_size that is a multiple of 8",
    ):
        check_batch_fits(6, {"data": 4, "fsdp": 2, "model": 1})
    check_batch_fits(16, {"data": 4, "fsdp": 2})
    plan = make_plan({"data": -1}, "dp", batch_size=6)  # one CPU device here
    assert plan.data_size == 1
    with pytest.raises(
        ValueError, match=r"sharding: 'zero' is not a preset; choose one of auto, dp, fsdp, tp, fsdp_tp"
    ):
        make_plan(None, "zero")
    # A preset whose axis has one device would quietly train data parallel: refused.
    with pytest.raises(
        ValueError, match=r"sharding: fsdp shards over the mesh axis fsdp, which has size 1 here .*--mesh fsdp=-1"
    ):
        make_plan(None, "fsdp")


def test_config_and_cli_refuse_bad_meshes_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"mesh has an unknown axis 'tensor'"):
        TrainConfig(mesh={"tensor": 2})
    with pytest.raises(ValueError, match=r"choose one of \('auto'"):
        TrainConfig(sharding="zero2")
    assert main(["train", "--mesh", "data=2", "--model", "tiny", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("arjax train: error: mesh data=2 x fsdp=1 x model=1 needs 2 devices but 1 are available")
    assert main(["train", "--mesh", "data=2,model", "--out", str(tmp_path / "r")]) == 2
    assert "is not AXIS=SIZE" in capsys.readouterr().err


def test_a_url_as_the_run_directory_is_refused(capsys):
    assert main(["train", "--model", "tiny", "--out", "gs://bucket/run"]) == 2
    assert "is a URL; arjax writes runs through the file system: mount the bucket" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ("127.0.0.1:1234", None, None),
            r"needs all three of --coordinator HOST:PORT, --num-processes N and --process-id I",
        ),
        (("localhost", 2, 0), r"--coordinator 'localhost' is not HOST:PORT"),
        (("127.0.0.1:1234", 2, 2), r"--process-id 2 with --num-processes 2: the id must be in 0..1"),
        (("[::1]:1234", 2, 5), r"--process-id 5 with --num-processes 2"),  # an IPv6 coordinator is fine
    ],
)
def test_multi_process_flags_are_checked(args, match):
    with pytest.raises(ValueError, match=match):
        init_distributed(*args)
    assert init_distributed() is False  # one process: nothing to join


# ----------------------------------------------------------------------------- subprocesses


def _run(args, devices, env, out, timeout=600):
    env = {
        **env,
        "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, CHECKS, *map(str, args), out],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc, what, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and f"PHASE {what} OK" in out, out[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory, subprocess_env):
    out = str(tmp_path_factory.mktemp("mesh"))
    # Independent groups run side by side (their XLA compiles are mostly single-threaded): the two
    # hosts and their one-process reference beside the 8-device phase; then the restores.
    eight = _run(["eight"], 8, subprocess_env, out)
    port = _free_port()
    hosts = [_run(["host", i, port], 2, subprocess_env, out) for i in (0, 1)]
    for proc in hosts:
        _wait(proc, "host")
    four = _run(["four"], 4, subprocess_env, out)
    _wait(eight, "eight")
    restore, one = _run(["restore"], 8, subprocess_env, out), _run(["one"], 1, subprocess_env, out)
    _wait(four, "four")
    _wait(restore, "restore")
    _wait(one, "one")
    results = {}
    for name in ("eight", "restore", "one", "host0", "host1", "four"):
        with open(os.path.join(out, f"{name}.json")) as f:
            results[name] = json.load(f)
    results["dir"] = out
    return results


@pytest.mark.slow
def test_every_leaf_is_placed_as_its_preset_says(mesh_results):
    r = mesh_results["eight"]
    assert r["devices"] == 8 and r["leaves_checked"] > 500
    assert r["sharding_problems"] == []
    # FSDP leaves at most ~2% of the parameter bytes whole on every device (here: none, or the odd bias).
    for name, fraction in r["replicated_fraction"].items():
        if name.startswith(("fsdp", "auto_fsdp")):
            assert fraction <= 0.02, (name, fraction)
        if name.startswith("dp8"):
            assert fraction == 1.0


@pytest.mark.slow
def test_three_steps_equal_one_device_on_every_mesh(mesh_results):
    eq = mesh_results["eight"]["equivalence"]
    assert set(eq) == {"dp8", "fsdp8", "dp2_tp4", "accum_4x2_vs_1x8"}
    for name, worst in eq.items():
        assert worst["loss_rel"] < 1e-5, (name, worst)
        assert worst["param_abs"] < 1e-5, (name, worst)


@pytest.mark.slow
def test_each_device_holds_the_samplers_rows_and_the_step_compiles_once(mesh_results):
    r = mesh_results["eight"]
    assert r["row_shards_checked"] == 48 and r["row_shards_wrong"] == 0
    # A 6-step run, a 3-step run and its resume (a restore) on the same mesh: one trace in all.
    assert r["traces_4x2"] == 1
    assert r["resumed_same_mesh_losses"] == r["straight_losses"]


@pytest.mark.slow
def test_a_checkpoint_restores_bitwise_on_any_mesh_and_training_continues(mesh_results):
    straight = mesh_results["eight"]["straight_losses"]
    restore, one = mesh_results["restore"], mesh_results["one"]
    assert restore["bitwise_2x4"] and restore["bitwise_8x1"] and one["bitwise_1"]
    assert restore["devices_2x4"] == 8 and one["devices"] == 1
    assert one["verify_ok"]  # written by 8 devices, verified on 1
    for losses in (restore["resumed_2x4_losses"], one["resumed_1_losses"]):
        assert losses == pytest.approx(straight[3:], rel=1e-5)


@pytest.mark.slow
def test_tensor_parallel_greedy_decoding_equals_one_device(mesh_results):
    r = mesh_results["restore"]
    assert r["generate_tp2_equal"] and r["generate_tp4_equal"]  # 2 KV heads: split on tp=2, replicated on tp=4
    assert (r["generate_tp2_devices"], r["generate_tp4_devices"]) == (2, 4)
    assert r["cli_generate_tp2"] == 0  # arjax generate --mesh model=2
    # The serving engine on the same weights, loaded from disk, on one device and on tp=2 and tp=4.
    assert r["engine_greedy_equals_generate"] and r["engine_tp2_equal"] and r["engine_tp4_equal"]
    assert r["engine_tp_compiles_after_warmup"] == 0


@pytest.mark.slow
def test_two_processes_train_like_one_process_of_four_devices(mesh_results):
    h0, h1 = mesh_results["host0"], mesh_results["host1"]
    assert (h0["process_count"], h0["devices"], h0["local_devices"]) == (2, 4, 2)
    assert h0["batch_rows_ok"] and h1["batch_rows_ok"]
    assert h0["local_rows"] == [[0, 2], [2, 4]] and h1["local_rows"] == [[4, 6], [6, 8]]
    assert h0["split_rows"] == [[0, 2], [4, 6]] and h1["split_rows"] == [[2, 4], [6, 8]]  # not one block per host
    assert h0["split_rows_ok"] and h1["split_rows_ok"] and h0["split_sum_ok"] and h1["split_sum_ok"]

    def records(name):
        with open(os.path.join(mesh_results["dir"], name, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    hosts, four = records("hosts"), records("four")
    # Every step once (process 0 alone writes; the second invocation resumed from both processes' checkpoint).
    assert [r["step"] for r in hosts] == [r["step"] for r in four] == [1, 2, 2, 3, 4, 4]
    for a, b in zip(hosts, four):
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert sorted(os.listdir(os.path.join(mesh_results["dir"], "hosts", "checkpoints"))) == ["2", "4"]


def test_a_step_that_will_not_fit_warns_naming_the_knobs(tmp_path, monkeypatch):
    import numpy as np

    from arjax.train import loop, perf
    from arjax.train.data import Windows

    monkeypatch.setattr(perf, "device_memory_bytes", lambda device: 1024)  # a 1 KiB device
    cfg = TrainConfig(
        model="tiny",
        model_overrides={"n_layers": 1},
        batch_size=2,
        seq_len=8,
        steps=1,
        warmup_steps=1,
        eval_iters=1,
        log_interval=1,
    )
    ids = np.arange(200, dtype=np.int32) % 256
    with pytest.warns(
        UserWarning,
        match=r"the train step needs \d+\.\d+ GiB per device but a device has 0\.0 GiB; lower "
        r"batch_size \(2\) and raise accum_steps \(1\).*mesh fsdp or model > 1",
    ):
        result = loop.fit(
            cfg,
            str(tmp_path / "r"),
            model_cfg=cfg.model_config(vocab_size=None),
            source=Windows(ids, 8),
            val_windows=ids[:18].reshape(1, 2, 9),
            quiet=True,
        )
    assert result["final_step"] == 1
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    assert {"tokens_per_s", "tokens_per_s_per_device", "mfu"} <= set(record) and 0 < record["mfu"] < 1
