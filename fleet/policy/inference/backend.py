"""Policy backends: one interface over the ways this project can run the policy for inference.

A backend answers `predict(batch, n_samples, temperature, generator, image_tokens=None)` exactly like
`FleetPolicy.predict` (one dict per row, physical-unit chunks), and is built from the fp32 master
`FleetPolicy`, which stays the source of truth (checkpoints, head swaps, validation):

    TorchBackend(model, "fp32")   eager torch; predicts with the model itself
    TorchBackend(model, "bf16")   eager torch on a copy: bf16 Linear/Conv weights, bf16 autocast
    TorchBackend(model, "int8")   eager torch on a copy: dynamically quantized int8 Linear layers
    OnnxBackend(model, ...)       ONNX Runtime, CPU execution provider, fp32 or int8 (onnx_backend.py)

PolicyBackend, the base both build on, is in base.py (so onnx_backend.py and this module do not import
each other).

Every backend splits the forward into the same stages, so the per-robot vision-encoder cache
(encoder_cache.py) works with all of them:

    proprio_tokens(batch)                           per-embodiment stems, fp32 torch (tiny)
    word_vectors(batch)                             the heads' word adapters on each row's words, or None
    image_tokens(image, instr_ids, words)           the vision encoder: (B, N, d) image tokens
    transform(tokens, emb_idx, proprio_tok, instr, words)  the backbone transformer: memory, pad_mask, pooled
    head_outputs(name, memory, pad_mask, ...)       one head on its rows: normalized chunk (+ extras)

`words` is None unless a row's head carries word adapters (learnt online for words pretraining never
saw, FleetPolicy.word_vectors); then it is (B, L, d) float32 and replaces the embedding lookup.

Stage boundaries are float32 numpy arrays (zero-copy to and from torch). A backend that holds its own
copy of the heads (`shares_model` False) is refreshed after a head swap: `prepare_head(name)` builds
the new head's runnable form from the master model (slow for ONNX: an export), `install_head` swaps
it in (fast, under the runtime's forward lock).
"""

from __future__ import annotations

import numpy as np
import torch

from fleet.policy.inference.base import PolicyBackend
from fleet.policy.inference.onnx_backend import OnnxBackend
from fleet.policy.inference.precision import check_precision, convert_module, precision_context

__all__ = ["BACKENDS", "OnnxBackend", "PolicyBackend", "TorchBackend", "make_backend"]

BACKENDS = ("torch", "onnx")


def _np(x: torch.Tensor) -> np.ndarray:
    x = x.detach()
    return (x if x.dtype in (torch.float32, torch.bool, torch.int64) else x.float()).numpy()


class TorchBackend(PolicyBackend):
    """Eager torch at a precision (precision.py). fp32 runs the master model itself."""

    kind = "torch"

    def __init__(self, model, precision: str = "fp32") -> None:
        super().__init__(model)
        self.precision = check_precision(precision)
        self.shares_model = self.precision == "fp32"
        self._context = lambda: precision_context(self.precision)
        self._convert = lambda module: convert_module(module, self.precision)
        if self.shares_model:
            self.backbone, self.heads = model.backbone, None
        else:
            self.backbone = self._convert(model.backbone)
            self.heads = {name: self._convert(model.head(name)) for name in model.specs}

    def head(self, name: str):
        return self.model.head(name) if self.heads is None else self.heads[name]

    def stem(self, name: str):
        return self.head(name).stem

    def image_tokens(self, image, instr_ids, words=None) -> np.ndarray:
        image, instr_ids = torch.as_tensor(image), torch.as_tensor(instr_ids)
        with torch.inference_mode(), self._context():
            return _np(self.backbone.vision_tokens(image, instr_ids, words))

    def transform(self, tokens, emb_idx, proprio_tok, instr_ids, words=None):
        with torch.inference_mode(), self._context():
            memory, pad_mask, pooled = self.backbone.transformer(
                torch.as_tensor(tokens), emb_idx, proprio_tok, torch.as_tensor(instr_ids), words=words
            )
            return _np(memory), _np(pad_mask), _np(pooled)

    def head_outputs(self, name, memory, pad_mask, n_samples, temperature, generator, row_samples=None):
        head = self.head(name)
        opts = {} if row_samples is None else {"row_samples": row_samples}
        with torch.inference_mode(), self._context():
            memory, pad_mask = torch.from_numpy(memory), torch.from_numpy(pad_mask)
            out = head.predict(memory, pad_mask, n_samples, temperature, generator, **opts)
            return {k: _np(v) for k, v in out.items()}

    def predict(self, batch, n_samples=1, temperature=0.0, generator=None, image_tokens=None):
        if self.shares_model and image_tokens is None:
            # the model's own forward (bit for bit what training and evaluation run)
            return self.model.predict(batch, n_samples=n_samples, temperature=temperature, generator=generator)
        return super().predict(batch, n_samples, temperature, generator, image_tokens)

    def prepare_head(self, name: str):
        return None if self.shares_model else self._convert(self.model.head(name))

    def install_head(self, name: str, prepared, version: int) -> None:
        if not self.shares_model:
            self.heads[name] = prepared
        super().install_head(name, prepared, version)


def make_backend(
    model,
    backend: str = "torch",
    precision: str = "fp32",
    threads: int | None = None,
    device: str = "cpu",
    graphs: bool = True,
) -> PolicyBackend:
    """The backend named by ServeConfig's `backend`, `precision`, `device` and `cuda_graphs` fields."""
    if device != "cpu":
        from fleet.policy.inference.device_backend import DeviceBackend

        if backend != "torch":
            raise ValueError(f"backend: expected 'torch' on device {device!r}, got {backend!r}")
        return DeviceBackend(model, device=device, precision=precision, graphs=graphs)
    precision = check_precision(precision)
    if backend == "torch":
        return TorchBackend(model, precision)
    if backend == "onnx":
        return OnnxBackend(model, precision=precision, threads=threads)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
