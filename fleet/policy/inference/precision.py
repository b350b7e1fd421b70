"""Inference precision for the backbone and heads: fp32, bf16, int8 (dynamic quantization of Linear layers).

    fast = convert_module(model.head("franka"), "int8")     # a converted copy; the original is untouched
    with precision_context("bf16"):                         # bf16 needs its autocast region at run time
        ...

fp32   the trained weights as they are.
bf16   Linear and Conv2d weights stored in bfloat16 and every matmul, convolution and attention run in
       bfloat16 under CPU autocast (this CPU has AVX512-BF16); LayerNorm, softmax, the residual stream
       and the outputs stay float32. Weights are converted once, so autocast does not re-cast them on
       every call.
int8   dynamic quantization of every Linear layer: int8 weights (per output channel), activations
       quantized per batch on the fly, int32 accumulation (fbgemm/x86 kernels; AVX512-VNNI here).
       Convolutions, embeddings, norms and attention stay float32.

What they buy here (`fleet bench infer`, whole policy call against eager fp32): at batch 1 neither pays
(bf16 ~0.7x, int8 ~0.9x): with d_model 128 a call is ~1500 small ops whose dispatch, not arithmetic, is the
time, and autocast's casts and int8's activation quantization add ops. At batch 64, where the matmuls
dominate, bf16 ~1.25x and int8 ~1.4x. ONNX Runtime (onnx_backend.py) is what removes the dispatch cost.

The proprio stems (one small Linear per embodiment) are left in fp32 everywhere: they run once per
row outside the autocast region and cost nothing.

Why torch.ao.quantization.quantize_dynamic and not torchao (both tried on this machine: torch 2.13, an
AMD EPYC with AVX512-VNNI and AVX512-BF16, 2 cores, the shipped model's sizes): torchao 0.18 installs from
PyPI (28 MB; its CUDA-only extension libraries fail to load on CPU, which it tolerates) and its
`Int8DynamicActivationInt8WeightConfig` runs, but in eager mode it is a tensor subclass whose per-call
quantize / int-matmul / dequantize steps dispatch through Python: measured 2.2x slower than fp32 on the
backbone and 4-7x slower on the heads at batch 1, and 1.3-1.9x slower at batch 64 (`Int8WeightOnlyConfig`:
1.5x slower at batch 1, 1.2x at 64). Its speed comes from torch.compile/Inductor and CUDA kernels, which a
CPU fleet server does not use. torch.ao's `DynamicQuantizedLinear` is one fused fbgemm/x86 op per layer:
about fp32's speed at batch 1 (the tiny d=128 layers are dispatch-bound) and ~1.4x faster at batch 64,
with no new dependency. torch.ao's eager quantization is deprecated in favour of torchao but ships and
works in torch 2.13; `quantize_dynamic` below is the one place to change if it goes.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig
from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return str(precision)


def precision_context(precision: str):
    """The autocast region `precision` needs around a converted module's forward (a no-op but for bf16)."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _skip(name: str) -> bool:
    # proprio stems stay fp32: they run outside the autocast region (see module docstring)
    return "stem" in name.split(".")


def _to_bf16(module: nn.Module) -> nn.Module:
    for name, sub in module.named_modules():
        if _skip(name):
            continue
        if isinstance(sub, nn.Linear | nn.Conv2d):
            sub.weight.data = sub.weight.data.to(torch.bfloat16)
            if sub.bias is not None:
                sub.bias.data = sub.bias.data.to(torch.bfloat16)
    return module


def quantize_dynamic(module: nn.Module) -> nn.Module:
    """Replace (in place) every Linear of `module` except the proprio stems with torch.ao's dynamically
    quantized int8 Linear (per-channel weights); returns the module."""
    names = {name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and not _skip(name)}
    if not names:
        return module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantization: deprecated, still supported in 2.13
        return ao_quantize_dynamic(module, dict.fromkeys(names, per_channel_dynamic_qconfig), inplace=True)


def convert_module(module: nn.Module, precision: str) -> nn.Module:
    """A copy of `module` (a backbone, a head or a whole FleetPolicy) converted to `precision`, in eval
    mode with gradients off; fp32 returns `module` itself."""
    precision = check_precision(precision)
    if precision == "fp32":
        return module
    out = copy.deepcopy(module).eval().requires_grad_(False)
    return _to_bf16(out) if precision == "bf16" else quantize_dynamic(out)
