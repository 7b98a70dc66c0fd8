"""MFU arithmetic: FLOPs per token by hand, the spec-sheet peak table by device_kind, the measured
CPU peak, device memory."""

import dataclasses
import time

import jax
import pytest

from arjax.model import count_params, get_config
from arjax.train import perf


@dataclasses.dataclass
class FakeDevice:
    """What perf reads of a jax.Device: its platform, its kind, and its memory stats."""

    device_kind: str
    platform: str = "gpu"
    stats: dict | None = None

    def memory_stats(self):
        return self.stats


def test_flops_per_token_by_hand():
    # "tiny": vocab 256, max_len 64, 2 layers, width 32, MLP 128, biases, learned positions, tied head.
    cfg = get_config("tiny")
    d, ff = 32, 128
    per_layer = 2 * 2 * d + 3 * (d * d + d) + (d * d + d) + (d * ff + ff) + (ff * d + d)  # 2 norms, qkv, out, MLP
    total = 256 * d + 64 * d + 2 * per_layer + 2 * d  # embedding, positions, layers, final norm
    assert count_params(cfg) == total == 35712
    n = total - 64 * d  # the position table is a lookup: no FLOPs
    assert perf.flops_per_token(cfg, 64) == 6 * n + 12 * 2 * d * 64 == 251_136
    assert perf.flops_per_token(cfg, 32) == 6 * n + 12 * 2 * d * 32


def test_flops_per_token_counts_every_weight_with_rope():
    cfg = get_config("tiny", pos="rope")  # no position table to leave out
    assert perf.flops_per_token(cfg, 16) == 6 * count_params(cfg) + 12 * cfg.n_layers * cfg.d_model * 16


def test_gpt2_small_matches_nanogpt():
    # nanoGPT's GPT-2 (vocab 50304) prints "number of parameters: 123.59M" (no position table) with
    # bias=False; with biases, as our gpt2-small has them, 102,144 more (8,448 per layer + ln_f).
    cfg = get_config("gpt2-small", vocab_size=50304)
    n = (perf.flops_per_token(cfg, 1024) - 12 * 12 * 768 * 1024) / 6
    assert n == count_params(cfg) - 1024 * 768 == 123_587_328 + 12 * 8_448 + 768


@pytest.mark.parametrize(
    "kind, platform, dtype, flops",
    [
        ("TPU v4", "tpu", "bfloat16", 275e12),
        ("TPU v4", "tpu", "float32", 275e12),  # float32 matmuls are one bf16 pass on the MXU
        ("TPU v5 lite", "tpu", "bfloat16", 197e12),
        ("TPU v5e", "tpu", "bfloat16", 197e12),
        ("TPU v5", "tpu", "bfloat16", 459e12),
        ("TPU v5p", "tpu", "bfloat16", 459e12),
        ("TPU v6 lite", "tpu", "bfloat16", 918e12),
        ("TPU v2", "tpu", "bfloat16", 22.5e12),  # one of a chip's two cores
        ("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "gpu", "float32", 495e12),  # TF32
        ("NVIDIA H100 PCIe", "gpu", "bfloat16", 756e12),
        ("NVIDIA H200", "gpu", "bfloat16", 989e12),
        ("NVIDIA H200", "gpu", "float16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "gpu", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "gpu", "float32", 156e12),
        ("NVIDIA A100-PCIE-40GB", "gpu", "bfloat16", 312e12),
    ],
)
def test_spec_sheet_peaks(kind, platform, dtype, flops):
    got, source = perf.device_peak_flops(FakeDevice(kind, platform), dtype)
    assert got == flops
    assert source.startswith("spec sheet")


@pytest.mark.parametrize("kind", ["NVIDIA GeForce RTX 4090", "TPU v4 lite", "Tesla V100-SXM2-16GB", "TPU7x"])
def test_unknown_accelerator_has_no_peak(kind):
    assert perf.device_peak_flops(FakeDevice(kind), "bfloat16") is None


def test_dtype_without_a_peak_is_refused():
    with pytest.raises(ValueError, match="int8"):
        perf.device_peak_flops(FakeDevice("NVIDIA H100 80GB HBM3"), "int8")


def test_mfu_arithmetic():
    # 100k tokens/s at 6e8 FLOPs each is 6e13 FLOP/s: a fifth of a 300 TFLOP/s device.
    assert perf.mfu(100_000, 6e8, 300e12) == pytest.approx(0.2)
    assert perf.mfu(0, 6e8, 1e12) == 0
    with pytest.raises(ValueError, match="positive"):
        perf.mfu(1, 1, 0)


def test_cpu_peak_is_measured_once_per_process():
    cpu = jax.devices("cpu")[0]
    first, source = perf.device_peak_flops(cpu, "float32")
    assert first > 1e8 and source.startswith("measured")
    hits = perf._cached_cpu_peak.cache_info().hits
    t = time.perf_counter()
    again, _ = perf.device_peak_flops(cpu, "float32")
    assert again == first and time.perf_counter() - t < 0.05
    assert perf._cached_cpu_peak.cache_info().hits == hits + 1


def test_device_memory():
    assert (
        perf.device_memory_bytes(
            FakeDevice("NVIDIA H100 80GB HBM3", stats={"bytes_limit": 79 << 30, "bytes_in_use": 0})
        )
        == 79 << 30
    )
    assert perf.device_memory_bytes(FakeDevice("TPU v4", "tpu", stats={"bytes_in_use": 0})) is None
    assert perf.device_memory_bytes(jax.devices("cpu")[0]) is None  # no stats on CPU; host RAM is not a device budget
