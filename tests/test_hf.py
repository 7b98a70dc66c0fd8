"""Hugging Face interop: logits parity with transformers, round trips, sharded loads, and refusals of bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from arjax.model import hf

VOCAB = 96


def _gpt2(vocab_size=VOCAB):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    # GQA (4 query heads share 2 kv heads), an untied head and a non-default rope_theta: each one a
    # place where a conversion can silently go wrong.
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random init leaves norms at 1; perturb them so a swapped norm would show up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    ref = _gpt2() if request.param == "gpt2" else _llama()
    return ref, hf.from_hf_model(ref)


def _padded_batch():
    """Left-padded prompts of lengths 12, 7 and 3, with our positions (-1 = pad) and HF's mask."""
    rng = np.random.RandomState(0)
    lengths, T = [12, 7, 3], 12
    tokens = np.zeros((3, T), np.int64)
    positions = np.full((3, T), -1, np.int64)
    for b, n in enumerate(lengths):
        tokens[b, T - n :] = rng.randint(3, VOCAB, n)
        positions[b, T - n :] = np.arange(n)
    return tokens, positions


def _hf_logits(model, tokens, positions=None):
    kw = {}
    if positions is not None:
        kw = {
            "attention_mask": torch.tensor(positions >= 0).long(),
            "position_ids": torch.tensor(np.maximum(positions, 0)),
        }
    with torch.no_grad():
        return model(torch.tensor(tokens), **kw).logits.float().numpy()


def test_logits_parity_on_padded_batch(pair):
    ref, ours = pair
    tokens, positions = _padded_batch()
    want = _hf_logits(ref, tokens, positions)
    got, _ = ours(jnp.asarray(tokens), jnp.asarray(positions))
    real = positions >= 0  # pad positions are meaningless in both
    diff = np.abs(np.asarray(got)[real] - want[real]).max()
    assert diff <= 1e-4, diff


def test_round_trip_reloads_in_transformers(pair, tmp_path):
    ref, ours = pair
    hf.to_hf_dir(ours, str(tmp_path))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(again) is type(ref)
    tokens, _ = _padded_batch()
    assert np.abs(_hf_logits(again, tokens) - _hf_logits(ref, tokens)).max() <= 1e-5
    # and back into arjax from the directory: the table is its own inverse
    back = hf.from_hf_dir(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(back(jnp.asarray(tokens))[0]), np.asarray(ours(jnp.asarray(tokens))[0]))


def test_config_mapping(pair):
    ref, ours = pair
    cfg = ours.cfg
    assert cfg.vocab_size == VOCAB and cfg.max_len == 128 and cfg.n_layers == 2 and cfg.n_heads == 4
    if cfg.pos == "rope":
        assert (cfg.num_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (2, 5000.0, 1e-5, False)
    else:
        assert (cfg.use_bias, cfg.tie_embeddings, cfg.ff_dim) == (True, True, 128)


def test_sharded_checkpoint_loads_without_torch(tmp_path):
    ref = _llama()
    ref.save_pretrained(str(tmp_path), max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    tokens, _ = _padded_batch()
    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "want.npy", _hf_logits(ref, tokens))
    # A fresh interpreter where importing torch fails: the directory path must not need it.
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, jax.numpy as jnp\n"
        "from arjax.model import hf\n"
        f"d = {str(tmp_path)!r}\n"
        "m = hf.from_hf_dir(d)\n"
        "got = np.asarray(m(jnp.asarray(np.load(d + '/tokens.npy')))[0])\n"
        "print(np.abs(got - np.load(d + '/want.npy')).max())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-4


def test_mistral_layout_loads_and_sliding_window_is_refused():
    torch.manual_seed(0)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        head_dim=8,
    )
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **kw)).eval()
    ours = hf.from_hf_model(ref)
    tokens, _ = _padded_batch()
    assert np.abs(np.asarray(ours(jnp.asarray(tokens))[0]) - _hf_logits(ref, tokens)).max() <= 1e-4
    bad = transformers.MistralConfig(sliding_window=16, **kw).to_dict()
    with pytest.raises(ValueError, match="sliding_window=16"):
        hf.config_from_hf(bad)


def _llama_dict(**changes):
    d = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    ).to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "gpt_neox"}, "unsupported model_type 'gpt_neox'"),
        ({"model_type": "qwen2"}, "Qwen2 is not supported"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ],
)
def test_unsupported_configs_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf(_llama_dict(**changes))


def test_gpt2_variants_are_refused():
    base = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4).to_dict()
    for field, value in [
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("activation_function", "relu"),
    ]:
        with pytest.raises(ValueError, match=field):
            hf.config_from_hf({**base, field: value})


def test_pickle_checkpoint_is_refused_without_reading_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama_dict()))
    # Not a real pickle: if we ever tried to unpickle it, the error would be different.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles.*safetensors"):
        hf.from_hf_dir(str(tmp_path))


def test_config_weights_shape_mismatch_is_refused(tmp_path):
    _llama().save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \(48, 32\) but config.json implies \(64, 32\)"):
        hf.from_hf_dir(str(tmp_path))


def test_missing_tensor_is_refused():
    ref = _gpt2()
    tensors = {k: v.numpy() for k, v in ref.state_dict().items() if "h.1.mlp.c_fc.weight" not in k}
    with pytest.raises(ValueError, match="lacks tensor 'transformer.h.1.mlp.c_fc.weight'"):
        hf.model_from_hf_tensors(ref.config.to_dict(), tensors)


def test_bias_free_gpt_layout_exports_as_gpt2_with_zero_biases(tmp_path):
    from flax import nnx

    from arjax.model import Transformer, get_config

    ours = Transformer(get_config("tiny", use_bias=False, vocab_size=VOCAB), rngs=nnx.Rngs(0))
    hf.to_hf_dir(ours, str(tmp_path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens, _ = _padded_batch()
    assert np.abs(np.asarray(ours(jnp.asarray(tokens))[0]) - _hf_logits(ref, tokens)).max() <= 1e-5


def _write_bpe(directory, vocab_size):
    from arjax.train.tokenizer import train_bpe

    text = directory / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, again and again. " * 50)
    return train_bpe(str(text), vocab_size, str(directory))


def test_convert_from_hf_and_back_through_a_run_directory(tmp_path):
    from arjax.train import checkpoint, convert

    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    ).eval()
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
    ref.save_pretrained(str(hf_dir))
    tok = _write_bpe(hf_dir, 300)
    convert.convert_from_hf(str(hf_dir), str(run))
    model, tok2, train_cfg = checkpoint.load_model(str(run))  # what `arjax generate --ckpt RUN` uses
    assert train_cfg is None  # converted weights: no training run, no placeholder config
    from arjax.train.cli import main

    assert main(["train", "--out", str(run), "--resume"]) == 2  # weights only: a clear error, not a KeyError
    assert tok2.encode("the lazy fox") == tok.encode("the lazy fox") and tok2.eos_id == tok.eos_id
    tokens, _ = _padded_batch()
    want = _hf_logits(ref, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens))[0]) - want).max() <= 1e-4
    convert.convert_to_hf(str(run), str(out))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert np.abs(_hf_logits(again, tokens) - want).max() <= 1e-5
    assert again.config.eos_token_id == tok.eos_id
    assert transformers.AutoTokenizer.from_pretrained(str(out))("the lazy fox")["input_ids"] == tok.encode(
        "the lazy fox"
    )


def test_generate_from_hf_dir_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    from arjax.train import convert, load

    _gpt2().save_pretrained(str(tmp_path))  # vocab 96
    _write_bpe(tmp_path, 300)
    with pytest.raises(ValueError, match=r"tokenizer has 2\d\d tokens but the model's vocab_size is 96"):
        load.load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer has 256 tokens but the model's vocab_size is 96"):
        convert.convert_from_hf(str(tmp_path), str(tmp_path / "run"), tokenizer="byte")


def test_convert_refuses_missing_or_foreign_tokenizers_and_replaces_out_dirs_whole(tmp_path, capsys):
    from arjax.train import convert
    from arjax.train.cli import main

    hf_dir = tmp_path / "hf"
    _gpt2(vocab_size=1000).save_pretrained(str(hf_dir))  # no tokenizer files
    with pytest.raises(ValueError, match="has no tokenizer .* pass --tokenizer DIR"):
        convert.convert_from_hf(str(hf_dir), str(tmp_path / "run"))
    with pytest.raises(
        ValueError, match="tokenizer has 256 tokens but the model's vocabulary has 1000: it is not the model's"
    ):
        convert.convert_from_hf(str(hf_dir), str(tmp_path / "run"), tokenizer="byte")
    assert not (tmp_path / "run").exists()  # nothing written by a refused conversion
    shutil.rmtree(hf_dir)
    _gpt2(vocab_size=300).save_pretrained(str(hf_dir))
    _write_bpe(hf_dir, 300)
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(run)]) == 0
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(run)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    out.mkdir()
    (out / "tokenizer.json").write_text("stale")
    (out / "stale.txt").write_text("stale")
    assert main(["convert", "--to-hf", str(run), "--out", str(out)]) == 2
    assert main(["convert", "--to-hf", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").read_text() != "stale"
    assert sorted(p.name for p in out.iterdir()) == [
        "arjax_tokenizer.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # --out may never be the source, or hold it: --overwrite would delete what is being converted.
    for target in (run, tmp_path):
        assert main(["convert", "--to-hf", str(run), "--out", str(target), "--overwrite"]) == 2
        assert "which is being converted; choose another --out" in capsys.readouterr().err
    assert (run / "checkpoints").is_dir()
    (tmp_path / "file").write_text("x")
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file; choose a directory" in capsys.readouterr().err


def test_malformed_hf_files_are_errors_naming_the_file(tmp_path):
    from arjax.train import load

    good = tmp_path / "good"
    _gpt2().save_pretrained(str(good))
    config = json.loads((good / "config.json").read_text())
    for name, change in [
        ("no-embd", lambda c: c.pop("n_embd")),
        ("str-layers", lambda c: c.update(n_layer="two")),
        ("not-json", None),
    ]:
        bad = tmp_path / name
        shutil.copytree(good, bad)
        if change is None:
            (bad / "config.json").write_text("{not json")
        else:
            c = dict(config)
            change(c)
            (bad / "config.json").write_text(json.dumps(c))
        with pytest.raises(ValueError, match=r"config.json"):
            hf.from_hf_dir(str(bad))
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        hf.from_hf_dir(str(truncated))
    with pytest.raises(ValueError, match="n_embd"):
        hf.from_hf_dir(str(tmp_path / "no-embd"))
    with pytest.raises(ValueError, match="n_layer='two'; it should be an integer"):
        load.load_hf(str(tmp_path / "str-layers"))


def test_cli_commands_parse_and_train_a_tokenizer(tmp_path):
    import argparse

    from arjax.train.cli import convert
    from arjax.train.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="arjax")
    convert.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", "--from-hf", "a", "--out", "b"])
    assert (args.from_hf, args.out, args.func) == ("a", "b", convert._cmd_convert)
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 40)
    args = parser.parse_args(
        ["tokenizer", "train", "--data", str(text), "--vocab-size", "280", "--out", str(tmp_path / "tok")]
    )
    assert args.func(args) == 0
    assert (
        load_tokenizer(str(tmp_path / "tok")).decode(load_tokenizer(str(tmp_path / "tok")).encode("to be")) == "to be"
    )
    with pytest.raises(ValueError, match="exactly one of"):
        convert._cmd_convert(parser.parse_args(["convert", "--out", "x"]))


def test_bfloat16_checkpoint_is_read_without_torch_dtypes(tmp_path):
    ref = _llama().to(torch.bfloat16)
    ref.save_pretrained(str(tmp_path))
    ours = hf.from_hf_dir(str(tmp_path))  # numpy has no bfloat16: read through ml_dtypes, widen to fp32
    want = ref.model.layers[0].mlp.gate_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(ours.blocks[0].mlp.gate.kernel[...]), want)


@pytest.mark.slow
def test_cli_generate_hf_and_convert_end_to_end(tmp_path, capsys):
    """`arjax generate --hf DIR` prints what transformers' greedy generate produces; convert + --ckpt agrees."""
    from arjax.train.cli import main

    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
        )
    ).eval()
    with torch.no_grad():  # margins between logits, so greedy is decided by the model, not by rounding
        for p in ref.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    hf_dir = tmp_path / "hf"
    ref.save_pretrained(str(hf_dir))
    tok = _write_bpe(hf_dir, 300)
    prompt = "the lazy"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=0)
    expected = tok.decode(out[0, ids.shape[1] :].tolist())
    assert len(expected) >= 6, expected  # a real continuation, not an immediate EOS
    args = ["--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"]
    assert main(["generate", "--hf", str(hf_dir), *args]) == 0
    assert prompt + expected in capsys.readouterr().out
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "run"), *args]) == 0
    assert prompt + expected in capsys.readouterr().out
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).config.eos_token_id == tok.eos_id
    assert main(["convert", "--from-hf", str(hf_dir)]) == 2  # usage error: one line, status 2
