"""Whether bf16 autocast pays off on this machine.

bf16 autocast is ~2x faster than fp32 for training on CPUs with native bf16 (AVX512-BF16 or AMX) and on
recent GPUs, but on a CPU without it PyTorch emulates bf16: measured on a 2-core AMD EPYC (AVX2 only), a
1024x1024 matmul ran at 0.83 GFLOPS in bf16 against 96.6 in fp32, and a 135M fine-tuning step went from
seconds to minutes. So every `bf16: true` in a config is a request that `use_bf16` grants only where
the hardware does it natively. `IMMUNIZER_BF16=1` (or `0`) overrides the detection."""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def bf16_native() -> bool:
    forced = os.environ.get("IMMUNIZER_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def use_bf16(requested: bool) -> bool:
    """bf16 where it was asked for and the hardware runs it natively; fp32 otherwise."""
    return bool(requested) and bf16_native()
