"""Hugging Face interop for run directories: a local HF checkpoint into an arjax run, and a run out to transformers."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from flax import nnx

from arjax.model import hf
from arjax.train import checkpoint as ckpt
from arjax.train.load import hf_dir_tokenizer
from arjax.train.tokenizer import ByteTokenizer, HFTokenizer, check_fits, load_tokenizer


def _tokenizer_for_convert(hf_dir: str, override: str | None):
    if override == "byte":
        return ByteTokenizer()
    if override:
        if not os.path.isdir(override):
            raise ValueError(f"--tokenizer {override!r} is not a directory; pass a tokenizer directory or 'byte'")
        return load_tokenizer(override)
    return hf_dir_tokenizer(hf_dir)


@contextlib.contextmanager
def _fresh_dir(out_dir: str, overwrite: bool, *, sources: tuple[str, ...]) -> Iterator[str]:
    """A new, empty directory to write into, which replaces ``out_dir`` only once everything is written.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then its old contents go away entirely
    (no stale tokenizer.json beside new weights). A failure leaves ``out_dir`` as it was. ``out_dir``
    may never be, or hold, any of the ``sources`` being read (overwriting it would delete them).
    """
    if not out_dir:
        raise ValueError("--out is empty; pass a directory")
    out_dir = os.path.realpath(out_dir)
    for src in map(os.path.realpath, sources):
        if os.path.commonpath([src, out_dir]) == out_dir:
            raise ValueError(f"--out {out_dir!r} is or holds {src!r}, which is being converted; choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} is a file; choose a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"--out {out_dir!r} is not empty; pass --overwrite to replace its contents, or choose a new directory"
        )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.arjax-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.isdir(out_dir):
            old = os.path.join(parent, f".{os.path.basename(out_dir)}.arjax-old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_from_hf(hf_dir: str, out_dir: str, *, tokenizer: str | None = None, overwrite: bool = False) -> str:
    """HF directory -> an arjax run directory (orbax checkpoint at step 0 + tokenizer/) that `generate --ckpt` reads.

    The checkpoint holds weights and the model config only (no optimizer state, no training
    config): ``load_model`` reads it; ``train --resume`` refuses it. The tokenizer must cover the
    model's vocabulary (up to padding), so a byte tokenizer cannot be paired with a GPT-2 model.
    ``tokenizer``: a tokenizer directory or 'byte', for an HF directory without one.
    """
    model = hf.from_hf_dir(hf_dir)
    tok = _tokenizer_for_convert(hf_dir, tokenizer)
    check_fits(tok, model.cfg.vocab_size, covers=True)
    meta = {
        "model_config": model.cfg.to_dict(),
        "tokenizer": getattr(tok, "kind", type(tok).__name__),
        "source": {"hf_dir": os.path.abspath(hf_dir), "hf_config": hf.read_hf_config(hf_dir)},
    }
    sources = (hf_dir,) + ((tokenizer,) if tokenizer and tokenizer != "byte" else ())
    with _fresh_dir(out_dir, overwrite, sources=sources) as tmp:
        tok.save(ckpt.tokenizer_dir(tmp))
        manager = ckpt.make_manager(tmp)
        meta["tokenizer_sha256"] = ckpt.tokenizer_digest(tmp)
        ckpt.save(manager, 0, params=nnx.state(model, nnx.Param), meta=meta)
        manager.wait_until_finished()
        manager.close()
    return out_dir


def convert_to_hf(run_dir: str, out_dir: str, *, overwrite: bool = False) -> str:
    """An arjax run directory -> config.json + model.safetensors (+ tokenizer) that transformers loads."""
    model, tok, _ = ckpt.load_model(run_dir)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_id", None) for k in ("eos", "bos", "pad")}
    with _fresh_dir(out_dir, overwrite, sources=(run_dir,)) as tmp:
        hf.to_hf_dir(model, tmp, **ids)
        if isinstance(tok, HFTokenizer):
            tok.save(tmp)
        else:  # byte/char vocabularies have no transformers tokenizer class; keep ours beside the weights
            tok.save(os.path.join(tmp, "arjax_tokenizer"))
    return out_dir
