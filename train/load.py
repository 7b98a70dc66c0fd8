"""Loading a model to decode with (an arjax run or a local Hugging Face directory; a draft model), and what identifies
the weights."""

from __future__ import annotations

import hashlib
import json
import os

from flax import nnx

from arjax.decode import DraftModel
from arjax.model import Transformer, hf
from arjax.train.checkpoint import fingerprints, load_model
from arjax.train.tokenizer import check_fits, load_hf_tokenizer, load_tokenizer

# Files that make a directory hold a tokenizer transformers can read.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def load_for_decoding(*, ckpt: str | None = None, hf_dir: str | None = None, mesh: dict | None = None):
    """``(model, tokenizer)`` from an arjax run directory (``ckpt``) or a local Hugging Face checkpoint
    directory (``hf_dir``), exactly one. ``mesh`` (``{axis: size}``, runs only) places the weights
    tensor-parallel on that mesh; decoding's KV cache follows them (rows and KV heads split). The
    model is float; ``arjax.model.quantize`` makes an int8 one from it."""
    if (ckpt is None) == (hf_dir is None):
        raise ValueError(
            "load_for_decoding takes exactly one of ckpt= (an arjax run directory) or hf_dir= (a "
            "Hugging Face checkpoint directory)"
        )
    if hf_dir is not None:
        if mesh is not None:
            raise ValueError(
                "a mesh needs an arjax run; convert the Hugging Face checkpoint first (arjax convert --from-hf)"
            )
        return load_hf(hf_dir)
    model, tokenizer, _ = load_model(ckpt, mesh=mesh, preset="tp")
    return model, tokenizer


def load_hf(hf_dir: str):
    """``(model, tokenizer)`` straight from a local HF checkpoint directory (config.json, *.safetensors, tokenizer)."""
    model = hf.from_hf_dir(hf_dir)
    tokenizer = hf_dir_tokenizer(hf_dir)
    check_fits(tokenizer, model.cfg.vocab_size, covers=True)
    return model, tokenizer


def hf_dir_tokenizer(hf_dir: str):
    """The tokenizer of an HF directory: ours (``arjax_tokenizer/``, what ``convert_to_hf`` writes for byte and
    char runs) or the one transformers reads; a ValueError saying what to pass when there is none."""
    ours = os.path.join(hf_dir, "arjax_tokenizer")
    if os.path.isdir(ours):
        return load_tokenizer(ours)
    if not any(all(os.path.isfile(os.path.join(hf_dir, f)) for f in files) for files in TOKENIZER_FILES):
        raise ValueError(
            f"{hf_dir!r} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model); a converted "
            "checkpoint carries its tokenizer so that generate needs nothing else: pass --tokenizer DIR (a "
            "tokenizer directory) or --tokenizer byte"
        )
    return load_hf_tokenizer(hf_dir)


def load_draft(run_dir: str, tokenizer, *, k: int) -> DraftModel:
    """The run in ``run_dir`` as a speculative draft of ``k`` tokens for a target that uses ``tokenizer``
    (the draft must use the same one)."""
    draft_model, draft_tok, _ = load_model(run_dir)
    if tokenizer_identity(draft_tok) != tokenizer_identity(tokenizer):
        raise ValueError(
            f"the draft in {run_dir!r} uses another tokenizer than the target; a draft must share the "
            "target's tokenizer and vocabulary"
        )
    return DraftModel(draft_model, k=k)


def tokenizer_identity(tokenizer) -> tuple:
    """What identifies a tokenizer here: its kind, size and every token's text."""
    size = tokenizer.vocab_size
    return (
        getattr(tokenizer, "kind", type(tokenizer).__name__),
        size,
        tuple(tokenizer.decode([i]) for i in range(min(size, 1 << 16))),
    )


def weights_digest(model: Transformer, tokenizer) -> str:
    """What identifies a model's text (a batch job records it): its config, every weight's fingerprint, its
    tokenizer."""
    body = {
        "config": model.cfg.to_dict(),
        "weights": fingerprints(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        "tokenizer": tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
