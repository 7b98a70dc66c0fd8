"""The multi-device checks of tests/test_mesh.py, run as separate processes with fake CPU devices.

    python tests/_mesh_checks.py eight OUT         8 devices: shardings, equivalence, accumulation, rows, save on 4 x 2
    python tests/_mesh_checks.py restore OUT       8 devices: restore on 2 x 4 and 8 x 1, continue on 2 x 4, tp decoding
    python tests/_mesh_checks.py one OUT           1 device: restore, continue
    python tests/_mesh_checks.py host I PORT OUT   process I of 2 (2 devices each) on 127.0.0.1:PORT
    python tests/_mesh_checks.py four OUT          1 process, 4 devices: the reference for the two hosts

Each phase writes OUT/<phase>.json; the test asserts on it. The device count comes from XLA_FLAGS.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

PHASE = sys.argv[1]
if PHASE == "host":  # must join the other process before any other JAX call
    from arjax.train.cli import main as cli_main

import jax
import optax
from flax import nnx

from arjax.decode import generate
from arjax.model import Transformer, get_config
from arjax.model.params import path_str
from arjax.model.rng import seed_key
from arjax.model.sharding import logical_axes, make_plan
from arjax.train import checkpoint as ckpt
from arjax.train import loop
from arjax.train.config import TrainConfig
from arjax.train.data import Windows
from arjax.train.optim import make_optimizer
from arjax.train.step import TRACE_COUNTS, TeacherForcing, compiled_train_step, sharded_train_step
from arjax.train.tokenizer import build_tokenizer

# What each preset must do, written out independently of arjax.model.sharding.PRESETS.
EXPECTED_RULES = {
    "dp": {},
    "fsdp": {"embed": "fsdp"},
    "tp": {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp_tp": {"embed": "fsdp", "heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
}
# Llama-like, 2 KV heads (fewer than tp=4: replicated), and GPT-2-like (biases, LayerNorm, learned positions).
LLAMA = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, pos="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)
GPT = dict(n_layers=2, d_model=64, n_heads=4)
T = 16
IDS = np.random.default_rng(0).integers(0, 256, size=5000).astype(np.int32)


def run_cfg(**kw) -> TrainConfig:
    base = dict(
        model="tiny",
        model_overrides=LLAMA,
        batch_size=8,
        seq_len=T,
        steps=6,
        warmup_steps=1,
        eval_interval=3,
        eval_iters=1,
        log_interval=1,
        ckpt_interval=3,
        lr=1e-2,
    )
    return TrainConfig(**{**base, **kw})


def fit(cfg: TrainConfig, run_dir: str, **kw):
    if not os.path.isdir(ckpt.tokenizer_dir(run_dir)):  # what `arjax train` saves beside the checkpoints
        build_tokenizer("byte").save(ckpt.tokenizer_dir(run_dir))
    val = np.stack([IDS[i * (T + 1) : (i + 1) * (T + 1)] for i in range(cfg.batch_size)])[None]
    return loop.fit(
        cfg,
        run_dir,
        model_cfg=cfg.model_config(vocab_size=None),
        source=Windows(IDS, T),
        val_windows=val,
        quiet=True,
        **kw,
    )


def flat(tree) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def save(out: str, name: str, result: dict) -> None:
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f)


def dims(spec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def check_shardings(result: dict) -> None:
    """Every parameter and optimizer-state leaf placed as its preset says; shard shapes; FSDP's replicated bytes.

    The plans' shardings are checked leaf by leaf for every preset and both models (shapes only);
    one model is then created for real on one mesh, and its arrays must carry exactly those shardings.
    """
    tx, _ = make_optimizer(lr=1e-3, warmup_steps=1, decay_steps=10, min_lr=0.0, weight_decay=0.1)
    checked, problems, replicated = 0, [], {}
    for name, mesh, preset in (
        ("dp8", {"data": 8}, "dp"),
        ("fsdp8", {"fsdp": 8}, "fsdp"),
        ("dp2_tp4", {"data": 2, "model": 4}, "tp"),
        ("fsdp2_tp4", {"fsdp": 2, "model": 4}, "fsdp_tp"),
        ("auto_fsdp8", {"fsdp": 8}, "auto"),
    ):
        rules = EXPECTED_RULES["fsdp_tp" if preset == "auto" else preset]
        for overrides in (LLAMA, GPT):
            model_cfg = get_config("tiny", **overrides)
            plan = make_plan(mesh, preset, model_cfg=model_cfg, batch_size=8)
            sizes = dict(plan.mesh.shape)
            abstract = nnx.split(nnx.eval_shape(lambda cfg=model_cfg: Transformer(cfg, rngs=nnx.Rngs(0))))[1]
            psh = plan.param_shardings(abstract)
            osh = plan.opt_shardings(tx, jax.eval_shape(tx.init, abstract), psh)
            total = rep = 0
            for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(psh)):
                axes = logical_axes(path)
                # Heads split by whole heads: a dimension of n heads x head_dim needs n divisible.
                units = [
                    n // (model_cfg.dim_per_head if a in ("heads", "kv_heads") else 1) for n, a in zip(x.shape, axes)
                ]
                want = tuple(
                    rules.get(a) if rules.get(a) and units[i] % sizes[rules[a]] == 0 else None
                    for i, a in enumerate(axes)
                )
                got = dims(s.spec, x.ndim)
                shard = tuple(n // (sizes[a] if a else 1) for n, a in zip(x.shape, want))
                checked += 1
                if got != want:
                    problems.append(f"{name} {path_str(path)}: {got} != {want}")
                if s.shard_shape(x.shape) != shard:
                    problems.append(f"{name} {path_str(path)}: shard shape {s.shard_shape(x.shape)} != {shard}")
                nbytes = x.size * x.dtype.itemsize
                total += nbytes
                rep += nbytes if all(a is None for a in got) else 0
            replicated[f"{name}/{'llama' if overrides is LLAMA else 'gpt'}"] = rep / total
            # Moments shard like their parameters; counters are replicated.
            by_path = {path_str(p): dims(s.spec, len(s.spec)) for p, s in jax.tree_util.tree_leaves_with_path(psh)}
            for moment in ("mu", "nu"):
                for path, s in jax.tree_util.tree_leaves_with_path(optax.tree_utils.tree_get(osh, moment)):
                    checked += 1
                    if dims(s.spec, len(s.spec)) != by_path[path_str(path)]:
                        problems.append(f"{name} {moment} {path_str(path)}: {s.spec}")
            for x, s in zip(jax.tree.leaves(jax.eval_shape(tx.init, abstract)), jax.tree.leaves(osh)):
                if x.ndim == 0 and not s.is_fully_replicated:
                    problems.append(f"{name}: a step count of the optimizer state is not replicated")
    # Created for real (sharded at creation): each array carries its planned sharding, each device its shard.
    model_cfg = get_config("tiny", **LLAMA)
    plan = make_plan({"fsdp": 2, "model": 4}, "fsdp_tp", model_cfg=model_cfg, batch_size=8)
    _, params, opt_state, (psh, osh) = loop.init_train_state(model_cfg, tx, plan, seed_key(0))
    for x, s in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((psh, osh))):
        checked += 1
        if x.sharding != s or any(d.data.shape != s.shard_shape(x.shape) for d in x.addressable_shards):
            problems.append(f"created array {x.shape} has {x.sharding.spec}, planned {s.spec}")
    result.update(leaves_checked=checked, sharding_problems=problems, replicated_fraction=replicated)


def three_steps(plan_mesh, preset, *, A=1, B=8, devices=None):
    """Losses and final parameters of three teacher-forced steps on fixed batches."""
    model_cfg = get_config(
        "tiny", **{**LLAMA, "n_layers": 1}
    )  # one layer: every program here compiles in half the time
    tx, _ = make_optimizer(lr=1e-2, warmup_steps=1, decay_steps=10, min_lr=0.0, weight_decay=0.1)
    plan = make_plan(plan_mesh, preset, model_cfg=model_cfg, batch_size=B, devices=devices)
    graphdef, params, opt_state, shardings = loop.init_train_state(model_cfg, tx, plan, seed_key(0))
    step_fn = sharded_train_step(graphdef, tx, plan, *shardings)
    feed = loop.batch_feeder(Windows(IDS, T), plan, accum_steps=A, batch_size=B, seed=7)
    objective = TeacherForcing()
    compiled = compiled_train_step(step_fn, plan, params, opt_state, feed(0), objective)
    losses = []
    key = jax.device_put(seed_key(0), plan.replicated)
    for step in range(3):
        params, opt_state, metrics = compiled(
            params, opt_state, feed(step), jax.device_put(np.int32(step), plan.replicated), key, objective
        )
        losses.append(float(metrics["loss"]))
    return losses, flat(params)


def check_equivalence(result: dict) -> None:
    one_losses, one_params = three_steps({"data": 1}, "dp", devices=jax.devices()[:1])
    worst = {}
    for name, mesh, preset in (
        ("dp8", {"data": 8}, "dp"),
        ("fsdp8", {"fsdp": 8}, "fsdp"),
        ("dp2_tp4", {"data": 2, "model": 4}, "tp"),
    ):
        losses, params = three_steps(mesh, preset)
        worst[name] = {
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, one_losses)),
            "param_abs": max(float(np.max(np.abs(params[k] - one_params[k]))) for k in params),
        }
    # Accumulation: 4 micro-batches of 2 equal 1 of 8, sharded (data=2 x model=4).
    acc_losses, acc_params = three_steps({"data": 2, "model": 4}, "tp", A=4, B=2)
    big_losses, big_params = three_steps({"data": 2, "model": 4}, "tp", A=1, B=8)
    worst["accum_4x2_vs_1x8"] = {
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(acc_losses, big_losses)),
        "param_abs": max(float(np.max(np.abs(acc_params[k] - big_params[k]))) for k in acc_params),
    }
    result["equivalence"] = worst


def check_rows(result: dict) -> None:
    """Each device's shard of a step's batch holds exactly the sampler's rows for it."""
    source, bad, shards = Windows(IDS, T), 0, 0
    for mesh in ({"data": 2, "fsdp": 2, "model": 2}, {"data": 8}, {"fsdp": 4, "model": 2}):
        plan = make_plan(mesh, None, batch_size=8)
        feed = loop.batch_feeder(source, plan, accum_steps=2, batch_size=8, seed=3)
        for step in (0, 5):
            full = source.batch(batch_size=16, seed=3, step=step).reshape(2, 8, T + 1)
            arr = feed(step)
            for shard in arr.addressable_shards:
                shards += 1
                bad += not np.array_equal(np.asarray(shard.data), full[shard.index])
    result.update(row_shards_checked=shards, row_shards_wrong=bad)


def timed(result: dict, name: str, fn) -> None:
    t = time.perf_counter()
    fn(result)
    result.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 2)


def phase_eight(out: str) -> None:
    result: dict = {"devices": jax.device_count()}
    timed(result, "shardings", check_shardings)
    timed(result, "equivalence", check_equivalence)
    timed(result, "rows", check_rows)
    t = time.perf_counter()
    # A run saved on a 4 x 2 mesh; the same run stopped after 3 steps and resumed on the same mesh
    # compiles its step once in all (the restore included).
    mesh42 = {"data": 4, "model": 2}
    before = TRACE_COUNTS["train_step"]
    straight = fit(run_cfg(mesh=mesh42), os.path.join(out, "straight"))
    half = fit(run_cfg(mesh=mesh42), os.path.join(out, "half"), stop_after=3)
    for copy in ("on_2x4", "on_1"):
        shutil.copytree(os.path.join(out, "half"), os.path.join(out, copy))
    again = fit(run_cfg(mesh=mesh42), os.path.join(out, "half"), resume=True)
    result["traces_4x2"] = TRACE_COUNTS["train_step"] - before
    result["straight_losses"] = straight["losses"]
    result["resumed_same_mesh_losses"] = half["losses"] + again["losses"]
    np.savez(os.path.join(out, "half_params.npz"), **flat(nnx.state(half["model"])))
    result["seconds"]["fits"] = round(time.perf_counter() - t, 2)
    save(out, "eight", result)


def phase_restore(out: str) -> None:
    result: dict = {}
    saved = np.load(os.path.join(out, "half_params.npz"))
    half = os.path.join(out, "on_2x4")
    for name, mesh in (("2x4", {"data": 2, "model": 4}), ("8x1", {"data": 8})):
        model, _, _ = ckpt.load_model(half, mesh=mesh, preset="fsdp_tp" if name == "2x4" else "dp")
        params = flat(nnx.state(model))
        result[f"bitwise_{name}"] = all(np.array_equal(params[k], saved[k]) for k in saved.files)
        result[f"devices_{name}"] = len(model.blocks[0].attn.q.kernel[...].sharding.device_set)
    resumed = fit(run_cfg(mesh={"data": 2, "model": 4}), half, resume=True)
    result["resumed_2x4_losses"] = resumed["losses"]
    # Tensor-parallel greedy decoding (2 KV heads: split on tp=2, replicated on tp=4) = one device.
    straight = os.path.join(out, "straight")
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    ref = generate(ckpt.load_model(straight)[0], prompts, max_new_tokens=12)
    for tp in (2, 4):
        model, _, _ = ckpt.load_model(straight, mesh={"model": tp}, preset="tp")
        out_tp = generate(model, prompts, max_new_tokens=12)
        result[f"generate_tp{tp}_equal"] = bool(np.array_equal(out_tp.tokens, ref.tokens))
        result[f"generate_tp{tp}_devices"] = len(model.blocks[0].attn.q.kernel[...].sharding.device_set)
    # The serving engine over the same weights loaded from disk (no biases: the first parameter is a
    # 2-D kernel): one device and tensor-parallel, greedy and seeded, give the same tokens.
    from arjax.decode.engine import Engine, Request

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )

    def engine_tokens(model, warm=False):
        engine, got = Engine(model, slots=4, max_len=32, chunk_steps=4), {}
        if warm:  # then nothing compiles: programs see the slots placed as warmup placed them
            engine.warmup()
            before = len(compiles)
        for i, p in enumerate(prompts):
            for j, temperature in enumerate((0.0, 1.0)):
                engine.submit(
                    Request(prompt=p, max_new_tokens=8, temperature=temperature, seed=i),
                    lambda u, key=(i, j): got.setdefault(key, []).extend(u.tokens),
                )
        engine.run_until_done()
        if warm:
            result["engine_tp_compiles_after_warmup"] = len(compiles) - before
        return [got[key] for key in sorted(got)]

    one_engine = engine_tokens(ckpt.load_model(straight)[0])
    result["engine_greedy_equals_generate"] = [one_engine[2 * i] for i in range(len(prompts))] == ref.tokens[
        :, :8
    ].tolist()
    for tp in (2, 4):
        result[f"engine_tp{tp}_equal"] = (
            engine_tokens(ckpt.load_model(straight, mesh={"model": tp}, preset="tp")[0], warm=tp == 2) == one_engine
        )
    from arjax.train.cli import main as cli_main

    result["cli_generate_tp2"] = cli_main(
        [
            "generate",
            "--ckpt",
            straight,
            "--mesh",
            "model=2",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--prompt",
            "ab",
        ]
    )
    save(out, "restore", result)


def phase_one(out: str) -> None:
    saved = np.load(os.path.join(out, "half_params.npz"))
    run = os.path.join(out, "on_1")
    model, _, _ = ckpt.load_model(run)
    params = flat(nnx.state(model))
    result = {
        "devices": jax.device_count(),
        "bitwise_1": all(np.array_equal(params[k], saved[k]) for k in saved.files),
        "verify_ok": all(r["ok"] for r in ckpt.verify(run)),
    }
    resumed = fit(run_cfg(mesh={"data": 1}), run, resume=True)
    result["resumed_1_losses"] = resumed["losses"]
    save(out, "one", result)


def host_args(run: str, steps: int, extra=()) -> list[str]:
    return [
        "train",
        "--model",
        "tiny",
        "--set",
        "model.n_layers=1",
        "--batch-size",
        "8",
        "--seq-len",
        str(T),
        "--steps",
        str(steps),
        "--warmup-steps",
        "1",
        "--eval-interval",
        "2",
        "--set",
        "eval_iters=1",
        "--log-interval",
        "1",
        "--ckpt-interval",
        "2",
        "--quiet",
        "--mesh",
        "data=-1",
        "--out",
        run,
        *extra,
    ]


def phase_host(pid: int, port: int, out: str) -> None:
    run = os.path.join(out, "hosts")
    dist = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
    # Two invocations: the second restores the checkpoint both processes wrote, and continues.
    assert cli_main(host_args(run, 2, dist)) == 0
    assert cli_main(host_args(run, 4, [*dist, "--resume"])) == 0
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }
    # The global batch: this process's shards hold the sampler's rows.
    cfg = run_cfg(mesh={"data": -1})
    plan = make_plan(cfg.mesh, None, batch_size=8)
    source = Windows(IDS, T)
    full = source.batch(batch_size=8, seed=5, step=2).reshape(1, 8, T + 1)
    arr = loop.batch_feeder(source, plan, accum_steps=1, batch_size=8, seed=5)(2)
    result["batch_rows_ok"] = all(np.array_equal(np.asarray(s.data), full[s.index]) for s in arr.addressable_shards)
    result["local_rows"] = sorted({(s.index[1].start, s.index[1].stop) for s in arr.addressable_shards})
    # Devices ordered so that each process holds rows in two runs (p0: 0-2 and 4-6), as on a slice
    # whose hosts each hold chips of several data groups: still assembled right.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    plan = make_plan({"data": -1}, None, batch_size=8, devices=[devices[0], devices[2], devices[1], devices[3]])
    arr = loop.batch_feeder(source, plan, accum_steps=1, batch_size=8, seed=5)(2)
    result["split_rows"] = sorted({(s.index[1].start, s.index[1].stop) for s in arr.addressable_shards})
    result["split_rows_ok"] = all(np.array_equal(np.asarray(s.data), full[s.index]) for s in arr.addressable_shards)
    result["split_sum_ok"] = int(jax.jit(lambda x: x.sum())(arr)) == int(full.sum())
    save(out, f"host{pid}", result)


def phase_four(out: str) -> None:
    from arjax.train.cli import main as cli_main

    assert cli_main(host_args(os.path.join(out, "four"), 4)) == 0
    save(out, "four", {"devices": jax.device_count()})


if __name__ == "__main__":
    out = sys.argv[-1]
    if PHASE == "host":
        phase_host(int(sys.argv[2]), int(sys.argv[3]), out)
    else:
        {"eight": phase_eight, "restore": phase_restore, "one": phase_one, "four": phase_four}[PHASE](out)
    print(f"PHASE {PHASE} OK", flush=True)
