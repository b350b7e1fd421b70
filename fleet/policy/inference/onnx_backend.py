"""ONNX Runtime backend: the backbone and the heads exported to ONNX and run on the CPU execution provider.

    backend = OnnxBackend(model, precision="int8", threads=2)     # exports every graph (seconds)
    rows = backend.predict(batch, n_samples=4)                    # like FleetPolicy.predict

Graphs, all with a dynamic batch dimension, exported from the running model (any PolicyConfig) with
the TorchScript exporter (`dynamo=False`: the torch.export path takes ~70 s for the unrolled decoder,
the tracer ~4 s, and hot swaps re-export a head):

    vision           image (B,H,W,3) uint8, instr_ids (B,L)              -> tokens (B,N,d)
    transformer      tokens, emb_ids (B,), proprio_tok (B,d), instr_ids  -> memory (B,S,d), pad_mask, pooled
    token_<name>     memory, pad_mask -> actions, entropy, probs (B,T,D): the whole greedy decode with its
                     KV cache, unrolled over the chunk (one session call instead of T)
    flow_<name>      memory, pad_mask, noise (B*K,T,D) -> samples (B,K,T,D): all Euler steps of the
                     sampler from given noise (drawn by the caller from its torch generator, so the
                     same generator gives the same samples as eager)

int8 runs onnxruntime.quantization.quantize_dynamic on every graph: MatMul/Gemm weights to int8 per
output channel, activations quantized on the fly (MatMulInteger); matmuls between two activations
(attention) stay float32. The proprio stems run in fp32 torch (one small Linear per embodiment).
On a CPU without VNNI (AVX2 or AVX-512 alone, e.g. the AMD EPYC of these machines) ORT's u8 x s8 kernels
can saturate their 16-bit intermediate sums, so the weights use 7 bits there (`reduce_range`, as ORT's
quantization guide advises): measured on the tiny test model, the features' max error went from 0.41 to
0.064 of a 2.68 activation scale (test tolerance 0.16).

While tracing, `_exportable` swaps three pieces of model code for graph-friendly equivalents (no data-
dependent mask shortcut, attention spelled out, a concatenating KV cache); the model files are untouched.
A token head's greedy decode then runs as one graph of ~2400 nodes: at batch 1 ORT's per-node cost, not
the matmuls, is what the graph's latency is made of.

Token heads decode greedily (temperature 0, what the server runs); temperature > 0 is refused.
Tolerances against eager fp32 (tests): fp32 graphs within 1e-4 on every output; int8 within a few
percent of the activation scale. Hot swaps re-export one head (a few seconds for a token head) outside
the runtime's forward lock.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fleet.policy.backbone as backbone_mod
import fleet.policy.heads as heads_mod
import fleet.policy.token_head as token_mod
from fleet.policy.inference.base import PolicyBackend
from fleet.policy.inference.precision import check_precision

OPSET = 17


def _always_mask(pad_mask: torch.Tensor | None) -> torch.Tensor | None:
    """attend_mask without its data-dependent shortcut (no mask when nothing is padded): a traced graph
    must take the masked path for every input; an all-False pad_mask then attends everywhere, as None does."""
    return None if pad_mask is None else ~pad_mask[:, None, None, :]


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """scaled_dot_product_attention spelled out (inference, no dropout): the exporter's own SDPA symbolic
    computes the scale and the causal mask from runtime shapes, ~40% of a decode graph's nodes."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = (q * scale) @ k.transpose(-2, -1)
    if is_causal:  # top-left aligned, as SDPA's is_causal
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(att, dim=-1) @ v


class _ConcatKVCache:
    """KVCache's interface with the keys/values grown by concatenation: a Concat per step in the graph
    instead of the preallocated buffer's in-place slice writes (ScatterND and index arithmetic)."""

    def __init__(self, batch: int, n_heads: int, length: int, head_dim: int, like: torch.Tensor) -> None:
        self.k = self.v = None
        self.size = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        self.size += k.shape[2]
        return self.k, self.v


_EXPORT_F = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if not name.startswith("__")})
_EXPORT_F.scaled_dot_product_attention = _attention


@contextlib.contextmanager
def _exportable():
    """While tracing, swap in graph-friendly equivalents of three pieces of the model code: attend_mask
    without its data-dependent shortcut, attention spelled out, and a concatenating KV cache. Each computes
    the same values (the ONNX tests check the graphs against eager within 1e-4); together they halve a token
    head's decode graph (~4900 -> ~2400 nodes after ORT's optimizer) and its batch-1 latency."""
    saved = backbone_mod.attend_mask, heads_mod.attend_mask, backbone_mod.F, token_mod.KVCache
    backbone_mod.attend_mask = heads_mod.attend_mask = _always_mask
    backbone_mod.F, token_mod.KVCache = _EXPORT_F, _ConcatKVCache
    try:
        yield
    finally:
        backbone_mod.attend_mask, heads_mod.attend_mask, backbone_mod.F, token_mod.KVCache = saved


class _Vision(nn.Module):
    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image, instr_ids):
        return self.backbone.vision_tokens(image, instr_ids)


class _Transformer(nn.Module):
    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, tokens, emb_ids, proprio_tok, instr_ids):
        return self.backbone.transformer(tokens, emb_ids, proprio_tok, instr_ids, mask_fn=_always_mask)


class _TokenDecode(nn.Module):
    def __init__(self, head) -> None:
        super().__init__()
        self.head = head

    def forward(self, memory, pad_mask):
        out = self.head.decode(memory, pad_mask, temperature=0.0, generator=None, use_cache=True)
        return out.actions, out.entropy, out.probs


def _repeat_rows(x: torch.Tensor, k) -> torch.Tensor:
    """(B, ...) -> (B*k, ...), each row k times in a row (repeat_interleave with a traceable k)."""
    return x.unsqueeze(1).expand(x.shape[0], k, *x.shape[1:]).reshape(-1, *x.shape[1:])


class _FlowSample(nn.Module):
    """FlowHead.sample from given noise, K = noise rows / memory rows (traced, so any K runs)."""

    def __init__(self, head) -> None:
        super().__init__()
        self.head = head

    def forward(self, memory, pad_mask, noise):
        head = self.head
        b = memory.shape[0]
        k = noise.shape[0] // b
        kvs, mask, direct = head.memory_context(memory, pad_mask)
        kvs = [(_repeat_rows(kk, k), _repeat_rows(v, k)) for kk, v in kvs]
        mask = None if mask is None else _repeat_rows(mask, k)
        if isinstance(direct, torch.Tensor):
            direct = _repeat_rows(direct, k)
        steps = head.config.n_euler
        dt = 1.0 / steps
        x = noise
        ones = noise[:, 0, 0] * 0.0 + 1.0  # (B*K,) of ones, shaped like the rows
        for i in range(steps):
            x = x + dt * head.velocity(x, ones * (i * dt), kvs, mask, direct)
        return x.reshape(b, k, x.shape[1], x.shape[2])


def _example(model, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs to trace with: 2 rows, the second instruction padded (so the masked path is what is traced)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (batch, cfg.image_size, cfg.image_size, 3), generator=gen, dtype=torch.uint8)
    instr = torch.randint(1, len(model.vocab), (batch, cfg.max_instr_len), generator=gen)
    instr[1:, cfg.max_instr_len // 2 :] = 0
    emb = torch.tensor([model.vocab.token_id(spec.token) for spec in model.specs.values()][:1] * batch)
    proprio_tok = torch.randn(batch, cfg.d_model, generator=gen)
    with torch.no_grad():
        tokens = model.backbone.vision_tokens(image, instr)
        memory, pad_mask, _ = model.backbone.transformer(tokens, emb, proprio_tok, instr)
    return {
        "image": image,
        "instr_ids": instr,
        "emb_ids": emb,
        "proprio_tok": proprio_tok,
        "tokens": tokens,
        "memory": memory,
        "pad_mask": pad_mask,
    }


def graph_names(model) -> list[str]:
    """The graphs OnnxBackend runs for `model`: vision, transformer, then token_<name> / flow_<name> per head."""
    return ["vision", "transformer"] + [f"{model.head(n).kind}_{n}" for n in model.specs]


def _graph(model, key: str, ex: dict) -> tuple[nn.Module, tuple, list[str], list[str]]:
    if key == "vision":
        return _Vision(model.backbone), (ex["image"], ex["instr_ids"]), ["image", "instr_ids"], ["tokens"]
    if key == "transformer":
        args = (ex["tokens"], ex["emb_ids"], ex["proprio_tok"], ex["instr_ids"])
        return (
            _Transformer(model.backbone),
            args,
            ["tokens", "emb_ids", "proprio_tok", "instr_ids"],
            ["memory", "pad_mask", "pooled"],
        )
    kind, _, name = key.partition("_")
    head = model.head(name)
    if kind == "token" and head.kind == "token":
        return (
            _TokenDecode(head),
            (ex["memory"], ex["pad_mask"]),
            ["memory", "pad_mask"],
            ["actions", "entropy", "probs"],
        )
    if kind == "flow" and head.kind == "flow":
        noise = torch.randn(ex["memory"].shape[0] * 2, head.chunk_size, head.action_dim)
        return _FlowSample(head), (ex["memory"], ex["pad_mask"], noise), ["memory", "pad_mask", "noise"], ["samples"]
    raise ValueError(f"onnx graph {key!r}: expected one of {graph_names(model)}")


def export_onnx(
    model, out_dir: str | os.PathLike, precision: str = "fp32", keys: list[str] | None = None
) -> dict[str, Path]:
    """Export the graphs `keys` (default: all of graph_names) of `model` to out_dir/<key>.onnx, int8-quantized
    to out_dir/<key>.int8.onnx when precision is "int8"; returns {key: path of the graph to run}."""
    precision = check_precision(precision)
    if precision == "bf16":
        raise ValueError(
            "precision: ONNX graphs are 'fp32' or 'int8' (ONNX Runtime's CPU provider has no bf16 "
            "matmul kernels); use backend 'torch' for bf16"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex = _example(model)
    paths = {}
    for key in keys or graph_names(model):
        module, args, inputs, outputs = _graph(model, key, ex)
        path = out / f"{key}.onnx"
        _export(module, args, path, inputs, outputs)
        if precision == "int8":
            qpath = out / f"{key}.int8.onnx"
            _quantize(path, qpath)
            path = qpath
        paths[key] = path
    return paths


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    # every tensor's dim 0 is the batch, but a flow graph's noise has B*K rows and its samples a K axis
    dynamic = {name: {0: "batch"} for name in inputs + outputs} | {
        "noise": {0: "rows"},
        "samples": {0: "batch", 1: "k"},
    }
    dynamic = {name: axes for name, axes in dynamic.items() if name in inputs + outputs}
    with _exportable(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints taken from shapes (they are traced)
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def _has_vnni() -> bool:
    """True when this CPU has int8 dot-product instructions (AVX-VNNI, AVX512-VNNI or AMX); False when it
    lacks them or cannot tell (then 7-bit weights are the safe choice)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # onnxruntime only when a graph is quantized

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" note at WARNING
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=not _has_vnni(),
            op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)


class _Session:
    """An InferenceSession fed by name; inputs the traced graph does not use (the instruction, for a vision
    encoder without keypoints) are dropped from the feed."""

    def __init__(self, session) -> None:
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})


def _session(data: bytes, threads: int) -> _Session:
    import onnxruntime as ort  # lazily: a torch-only server (the default backend) never loads ONNX Runtime

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return _Session(ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]))


class OnnxBackend(PolicyBackend):
    """Every graph in an ONNX Runtime session (CPU execution provider); precision "fp32" or "int8"."""

    kind = "onnx"

    def __init__(self, model, precision: str = "fp32", threads: int | None = None, heads=None) -> None:
        """heads: the embodiments whose heads to export (default all; a benchmark of a few saves the export)."""
        super().__init__(model)
        self.precision = check_precision(precision)
        self.threads = int(threads or torch.get_num_threads())
        names = list(model.specs) if heads is None else [model.head(n).name for n in heads]
        self._stems = {name: copy.deepcopy(model.head(name).stem) for name in names}
        keys = ["vision", "transformer"] + [f"{model.head(n).kind}_{n}" for n in names]
        with tempfile.TemporaryDirectory(prefix="fleet-onnx-") as tmp:
            paths = export_onnx(model, tmp, self.precision, keys=keys)
            self._sessions = {key: _session(path.read_bytes(), self.threads) for key, path in paths.items()}

    # ----- head swaps ----------------------------------------------------------------------------------
    def prepare_head(self, name: str) -> tuple:
        """Export head `name` of the master model (seconds): (its session, a copy of its stem)."""
        key = f"{self.model.head(name).kind}_{name}"
        with tempfile.TemporaryDirectory(prefix="fleet-onnx-") as tmp:
            path = export_onnx(self.model, tmp, self.precision, keys=[key])[key]
            return key, _session(path.read_bytes(), self.threads), copy.deepcopy(self.model.head(name).stem)

    def install_head(self, name: str, prepared: tuple, version: int) -> None:
        key, session, stem = prepared
        self._sessions[key], self._stems[name] = session, stem
        super().install_head(name, prepared, version)

    # ----- stages --------------------------------------------------------------------------------------
    def stem(self, name: str):
        return self._stems[name]

    def image_tokens(self, image, instr_ids, words=None) -> np.ndarray:
        if words is not None:  # word adapters: the exported graph embeds ids itself, so the master runs it
            with torch.inference_mode():
                return self.model.backbone.vision_tokens(
                    torch.as_tensor(image), torch.as_tensor(instr_ids), words
                ).numpy()
        feeds = {"image": np.asarray(image), "instr_ids": np.asarray(instr_ids)}
        return self._sessions["vision"].run(feeds)[0]

    def transform(self, tokens, emb_idx, proprio_tok, instr_ids, words=None):
        # rows of a body added after pretraining: its token row lives in its head, not in the exported table
        if words is not None or bool((np.asarray(emb_idx) >= self.model.base_vocab_size).any()):
            with torch.inference_mode():
                out = self.model.backbone.transformer(
                    torch.as_tensor(tokens), emb_idx, proprio_tok, torch.as_tensor(instr_ids), words=words
                )
                return tuple(t.numpy() for t in out)
        feeds = {
            "tokens": np.asarray(tokens, np.float32),
            "emb_ids": np.asarray(emb_idx),
            "proprio_tok": np.asarray(proprio_tok, np.float32),
            "instr_ids": np.asarray(instr_ids),
        }
        memory, pad_mask, pooled = self._sessions["transformer"].run(feeds)
        return memory, pad_mask, pooled

    def head_outputs(self, name, memory, pad_mask, n_samples, temperature, generator, row_samples=None):
        head = self.model.head(name)
        session = self._sessions.get(f"{head.kind}_{name}")
        if session is None:
            raise ValueError(f"onnx backend: head {name!r} was not exported (heads={sorted(self._stems)})")
        feeds = {"memory": np.ascontiguousarray(memory), "pad_mask": np.ascontiguousarray(pad_mask)}
        if head.kind == "token":
            if temperature > 0.0:
                raise ValueError("onnx backend: token heads decode greedily; temperature must be 0")
            actions, entropy, probs = session.run(feeds)
            return {"chunk": actions, "entropy": entropy, "probs": probs}
        b = memory.shape[0]
        if row_samples is not None:
            return self._ragged_flow(name, session, feeds, row_samples, generator)
        noise = torch.randn((b * n_samples, head.chunk_size, head.action_dim), generator=generator)
        samples = session.run(feeds | {"noise": noise.numpy()})[0]
        chunk = samples[:, 0] if name in self.model.config.flow_execute_sample else samples.mean(axis=1)
        return {"chunk": np.clip(chunk, -1.0, 1.0), "samples": samples}

    def _ragged_flow(self, name, session, feeds, row_samples, generator) -> dict[str, np.ndarray]:
        """Rows with their own K in one session call: each row's memory repeated K_i times, one sample each."""
        head = self.model.head(name)
        ks = np.asarray(row_samples, np.int64)
        rep = {k: np.repeat(v, ks, axis=0) for k, v in feeds.items()}
        noise = torch.randn((int(ks.sum()), head.chunk_size, head.action_dim), generator=generator)
        flat = session.run(rep | {"noise": noise.numpy()})[0][:, 0]  # (sum K, T, D)
        parts = np.split(flat, np.cumsum(ks)[:-1])
        samples = np.full((len(ks), int(ks.max()), *flat.shape[1:]), np.nan, np.float32)
        for i, part in enumerate(parts):
            samples[i, : len(part)] = part
        first = name in self.model.config.flow_execute_sample
        chunk = np.stack([p[0] if first else p.mean(axis=0) for p in parts])
        return {"chunk": np.clip(chunk, -1.0, 1.0), "samples": samples, "row_samples": ks}

    def close(self) -> None:
        self._sessions.clear()
