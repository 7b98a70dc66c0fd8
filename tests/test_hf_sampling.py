"""Our samplers vs transformers: filtered distributions equal HF's warpers, draws follow them,
greedy decoding matches."""

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.generation import logits_process as lp

from arjax.decode import SamplingParams, filter_logits, generate, sample
from arjax.model import hf

V = 64


def _hf_filter(logits, presence, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """One row through HF's processors, added exactly as GenerationMixin._get_logits_processor adds them."""
    procs = []
    if repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(lp.TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p > 0.0:
        procs.append(lp.MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    ids = torch.tensor(np.flatnonzero(presence))[None]  # the penalty only looks at which ids occurred
    scores = torch.tensor(logits, dtype=torch.float32)[None]
    for p in procs:
        scores = p(ids, scores)
    return scores[0].numpy()


def _random_logits(rng, rows, *, ties):
    x = rng.randn(rows, V).astype(np.float32) * 2.0
    if ties:  # coarse values: many exact ties, including at the top-k and top-p boundaries
        x = np.round(x * 2.0) / 2.0
    return x


SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.3),
    dict(top_k=1),
    dict(top_k=7),
    dict(top_k=V),
    dict(top_p=0.9),
    dict(top_p=0.5),
    dict(top_p=1e-4),  # keeps only the top token (min_tokens_to_keep=1)
    dict(min_p=0.05),
    dict(min_p=0.3),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8),
    dict(repetition_penalty=1.2, temperature=0.8, top_k=20, top_p=0.8, min_p=0.02),
    dict(temperature=1.5, top_k=12, top_p=0.6),
]


@contextlib.contextmanager
def _stable_torch_sort():
    """torch.sort on CPU is unstable above 16 elements, so which of several EXACTLY tied logits
    TopPLogitsWarper drops at the threshold is an accident of torch's sort. We break such ties by
    token id (a stable sort); with ties, compare against HF run with that same deterministic sort."""
    real = torch.sort
    with mock.patch.object(torch, "sort", lambda x, *a, **k: real(x, *a, **{**k, "stable": True})):
        yield


@pytest.mark.parametrize("ties", [False, True])
def test_filters_equal_hf_warpers(ties):
    rng = np.random.RandomState(1 + ties)
    rows_per_setting = 4
    B = rows_per_setting * len(SETTINGS)
    logits = _random_logits(rng, B, ties=ties)
    presence = rng.rand(B, V) < 0.2
    per_row = [s for s in SETTINGS for _ in range(rows_per_setting)]
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    defaults = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    # All settings in one batch: per-row traced values must not leak between rows.
    params = SamplingParams.make(B, **{k: [s.get(k, defaults[k]) for s in per_row] for k in keys})
    ours = np.asarray(filter_logits(jnp.asarray(logits), params, jnp.asarray(presence)))
    for b, setting in enumerate(per_row):
        if ties:
            # Unpatched HF: the same number of tokens survive with the same probabilities; only
            # the identity of exactly tied tokens at the top-p threshold may differ.
            loose = _hf_filter(logits[b], presence[b], **setting)
            np.testing.assert_allclose(
                np.sort(np.asarray(jax.nn.softmax(ours[b]))),
                np.sort(torch.softmax(torch.tensor(loose), -1).numpy()),
                atol=1e-6,
                rtol=0,
            )
        with _stable_torch_sort() if ties else contextlib.nullcontext():
            want = _hf_filter(logits[b], presence[b], **setting)
        kept = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(ours[b]), kept, err_msg=f"row {b}: {setting}")
        p_ours = np.asarray(jax.nn.softmax(ours[b]))
        p_hf = torch.softmax(torch.tensor(want), -1).numpy()
        np.testing.assert_allclose(p_ours, p_hf, atol=1e-6, rtol=0, err_msg=f"row {b}: {setting}")


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # probabilities 0.1, 0.2, 0.3, 0.4: top_p=0.65 needs 0.4 + 0.3 (crossing 0.65), so two tokens survive;
    # top_p=0.7 is reached exactly by 0.4 + 0.3, which HF also keeps as two (cumsum of the rest <= 0.3).
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    for top_p in (0.65, 0.7, 0.75, 0.95):
        want = _hf_filter(logits[0], np.zeros(4, bool), top_p=top_p)
        got = np.asarray(filter_logits(jnp.asarray(logits), SamplingParams.make(1, top_p=top_p)))[0]
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"top_p={top_p}")
    assert np.isfinite(got).sum() == 4 and np.isfinite(_hf_filter(logits[0], np.zeros(4, bool), top_p=0.65)).sum() == 2


def _chi_square_p_value(counts, probs):
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    stat = float((((counts[kept] - expected) ** 2) / expected).sum())
    df = int(kept.sum()) - 1
    return float(jax.scipy.special.gammaincc(df / 2.0, stat / 2.0)), stat


def test_draws_follow_the_filtered_distribution():
    n, vocab = 20_000, 10
    logits = np.array([2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0], np.float32)
    presence = np.zeros(vocab, bool)
    presence[[0, 4]] = True
    setting = dict(temperature=0.9, top_k=7, top_p=0.95, repetition_penalty=1.2)
    want = _hf_filter(logits, presence, **setting)
    probs = torch.softmax(torch.tensor(want), -1).numpy().astype(np.float64)
    params = SamplingParams.make(n, **setting)
    draws = np.asarray(
        sample(jax.random.key(0), jnp.broadcast_to(logits, (n, vocab)), params, jnp.broadcast_to(presence, (n, vocab)))
    )
    counts = np.bincount(draws, minlength=vocab)
    assert counts[probs == 0].sum() == 0, "drew a token the filters removed"
    p_value, stat = _chi_square_p_value(counts, probs)
    assert p_value > 1e-3, (stat, counts, probs)
    # The test has power: the unfiltered distribution is rejected by the same statistic.
    p_raw, _ = _chi_square_p_value(counts, np.asarray(jax.nn.softmax(logits)).astype(np.float64))
    assert p_raw < 1e-6


def _peaky(model):
    """Random init gives near-uniform logits where argmax is a coin toss between fp32 rounding modes;
    scale the weights up so greedy choices have margins and parity tests the model, not the rounding."""
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model.eval()


def _hf_models():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
        )
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rope_theta=5000.0,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    return {"gpt2": _peaky(gpt2), "llama": _peaky(llama)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_matches_hf_generate(family):
    ref = _hf_models()[family]
    ours = hf.from_hf_model(ref)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(1, V, n)) for n in (9, 3, 6)]
    new = 64
    out = generate(ours, prompts, max_new_tokens=new, pad_id=0)
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        want = ref.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
        )[:, P:].numpy()
    np.testing.assert_array_equal(out.tokens, want)
    assert (out.lengths == new).all()
    # Greedy with a repetition penalty: HF applies it as a processor before the argmax, as we do.
    # New sampling values are traced arrays, so this reuses the compiled program.
    greedy_penalised = SamplingParams.make(len(prompts), temperature=0.0, repetition_penalty=1.5)
    out = generate(ours, prompts, max_new_tokens=new, pad_id=0, sampling=greedy_penalised)
    with torch.no_grad():
        want_penalised = ref.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=0,
            use_cache=True,
        )[:, P:].numpy()
    assert (want_penalised != want).any()  # the penalty changed the tokens, so this checks something new
    np.testing.assert_array_equal(out.tokens, want_penalised)
