"""Every run config in tpu_configs/ parses into a TrainConfig; config loading is strict about keys and types."""

import pathlib

import pytest

from arjax.model import count_params
from arjax.train.config import TrainConfig, from_dict, load_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "tpu_configs"
ALL = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in ALL}
    assert {"cpu-demo.yaml", "shakespeare-char.yaml", "shakespeare-char-cpu.yaml"} <= names
    assert len(names) >= 6


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_every_config_parses_and_builds_its_model(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, TrainConfig)
    model_cfg = cfg.model_config(vocab_size=None)
    assert cfg.context_len(model_cfg) <= model_cfg.max_len
    assert count_params(model_cfg) > 0  # shapes only (eval_shape): nothing allocated


def test_nanogpt_recipes():
    big = load_config(str(CONFIG_DIR / "shakespeare-char.yaml"))
    m = big.model_config(vocab_size=65)
    assert (m.n_layers, m.n_heads, m.d_model, big.seq_len, big.batch_size) == (6, 6, 384, 256, 64)
    assert (big.lr, big.steps, m.dropout, big.tokenizer) == (1e-3, 5000, 0.2, "char")
    cpu = load_config(str(CONFIG_DIR / "shakespeare-char-cpu.yaml"))
    m = cpu.model_config(vocab_size=65)
    assert (m.n_layers, m.n_heads, m.d_model, cpu.seq_len, cpu.batch_size, cpu.steps) == (4, 4, 128, 64, 12, 2000)
    assert (cpu.lr, cpu.min_lr, cpu.lr_decay_steps, m.dropout) == (1e-3, 1e-4, 2000, 0.0)


def test_tpu_configs_use_bf16():
    for path in CONFIG_DIR.glob("gpt2-small-*.yaml"):
        cfg = load_config(str(path))
        assert cfg.model_config(vocab_size=None).dtype == "bfloat16"


RESOLVE = """
import json, sys
import jax
from arjax.model.sharding import describe, make_plan
from arjax.train.config import load_config
out = {}
for path, n in json.loads(sys.argv[1]).items():
    cfg = load_config(path)
    plan = make_plan(cfg.mesh, cfg.sharding, model_cfg=cfg.model_config(vocab_size=None), batch_size=cfg.batch_size,
                     devices=jax.devices()[:n])
    out[path] = dict(plan.mesh.shape) | {"preset": plan.preset}
print(json.dumps(out))
"""


def test_every_config_names_its_devices_and_its_mesh_resolves_on_them(subprocess_env):
    """Each config's first line names its device count; its mesh, sharding preset, batch and model
    resolve on that many (fake CPU) devices, every device used."""
    import json
    import subprocess
    import sys

    counts = {}
    for path in ALL:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# devices: "), f"{path.name}: first line should be '# devices: N'"
        counts[str(path)] = int(first.split(":")[1])
        assert load_config(str(path)).mesh is not None, f"{path.name} names no mesh"
    env = {
        **subprocess_env,
        "XLA_FLAGS": f"{subprocess_env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=32",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RESOLVE, json.dumps(counts)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meshes = json.loads(proc.stdout.splitlines()[-1])
    for path, n in counts.items():
        m = meshes[path]
        assert m["data"] * m["fsdp"] * m["model"] == n, (path, m)
    by_name = {pathlib.Path(p).name: m for p, m in meshes.items()}
    assert by_name["gpt2-small-kaggle-v5e-8.yaml"] == {"data": 8, "fsdp": 1, "model": 1, "preset": "dp"}
    assert by_name["gpt2-small-v4-8.yaml"] == {"data": 1, "fsdp": 4, "model": 1, "preset": "fsdp"}
    assert by_name["gpt2-small-v5e-32-multihost.yaml"] == {"data": 4, "fsdp": 8, "model": 1, "preset": "fsdp"}


def test_unknown_key_is_named_with_the_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['learning_rate'\]; known keys are \[.*'lr'"):
        load_config(str(p))


@pytest.mark.parametrize(
    "text, match",
    [
        ("steps: ten\n", r"TrainConfig.steps='ten' \(str\) should be int"),
        ("steps: true\n", r"TrainConfig.steps=True \(bool\) should be int"),
        ("lr: fast\n", r"TrainConfig.lr='fast' \(str\) should be int or float"),
        ("tokenizer: bpe\n", r"tokenizer='bpe'; choose one of"),
        ("model: gpt5\n", r"unknown model preset 'gpt5'"),
        ("model_overrides: {n_layer: 2}\n", r"unknown ModelConfig keys \['n_layer'\]"),
        ("- a list\n", r"must hold a mapping"),
        ("steps: [\n", r"not valid YAML"),
    ],
)
def test_bad_values_are_errors(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(str(p))


def test_yaml_exponent_floats_and_overrides(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("lr: 1e-3\nmin_lr: 5E-5\n")  # YAML 1.1 would read these as strings
    cfg = load_config(str(p), steps=7)
    assert (cfg.lr, cfg.min_lr, cfg.steps) == (1e-3, 5e-5, 7)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_seq_len_longer_than_model_is_refused():
    cfg = from_dict({"model": "tiny", "seq_len": 100})
    with pytest.raises(ValueError, match=r"seq_len=100 exceeds the model's max_len=64"):
        cfg.context_len(cfg.model_config(vocab_size=256))
