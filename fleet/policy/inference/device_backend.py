"""DeviceBackend: the policy on an accelerator (CUDA), with half precision and CUDA graphs.

The fp32 master model stays on the host (checkpoints, head validation and swaps, as for every backend);
this backend keeps its own copy of the backbone and heads on `device` and runs the whole forward there:

    backend = DeviceBackend(model, device="cuda", precision="bf16", graphs=True)
    rows = backend.predict(batch, n_samples=4, generator=g)       # FleetPolicy.predict's rows

One batch, one trip each way: the batch's fields (and the flow heads' noise, drawn on the host from the
caller's generator, so a seeded server gives the same chunks on every device) are packed into pinned
host buffers and copied with non-blocking copies; every output the reply needs is gathered on the device
into one float32 buffer and copied back in one transfer. No per-row transfers.

CUDA graphs (`graphs=True`, CUDA only). A batch-1 call of this model is about 1,500 small kernels, so on a
GPU it is bound by kernel launches, not arithmetic; a captured graph replays them with one launch. Graphs
have fixed shapes, so batches are padded to a bucket (1, 2, 4, ..., 64; padding rows repeat a real row
and are dropped): one graph per bucket for the backbone (vision encoder + transformer) and one per
(head, bucket, samples) for the token heads' cached greedy decode and the flow heads' Euler loop.
What cannot be captured runs eagerly on the device: rows with word adapters or cached image tokens
(the backbone), token heads at temperature > 0 (sampling). Rows asking for their own number of flow samples
draw the batch's largest K in the graph and keep their first K_i. A head group with a committed prefix
(real-time chunking: guidance needs a vector-Jacobian product, forcing the decode loop) runs on the fp32
master head on the host, the rule of every backend that is not the master (base.py). A head hot swap
captures the new head's graphs in `prepare_head`, outside the runtime's forward lock, while the old graphs
keep serving; `install_head` swaps them in.

The same code runs on the CPU (`device="cpu"`): static buffers, buckets and padding included
(`pad=True`), with the graphs replaced by eager calls on the static buffers. The default test suite
checks it there against the master model; tests/gpu/ checks the CUDA path where a GPU exists.

Precisions: "fp32"; "bf16" / "fp16" run under autocast on the device (weights stay fp32, autocast casts
once per graph capture); int8 is a CPU path (dynamic quantization) and is refused here.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable

import numpy as np
import torch

import fleet.policy.backbone as backbone_mod
import fleet.policy.heads as heads_mod
from fleet.policy.inference.base import PolicyBackend
from fleet.policy.inference.onnx_backend import _always_mask, _FlowSample, _TokenDecode, _Transformer, _Vision
from fleet.serving.device import check_device

DEVICE_PRECISIONS = ("fp32", "bf16", "fp16")
BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """torch.device for `device`, or ValueError saying which devices this process sees."""
    check_device("device", device)
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device: {device!r} asked for, but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda or 'none'}); use 'cpu' or run on a GPU node"
        )
    count = torch.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= count:
        raise ValueError(
            f"device: {device!r} asked for, but this process sees {count} CUDA device(s): cuda:0..{count - 1}"
        )
    return torch.device("cuda", index)


def bucket(n: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket >= n (n itself past the largest: such a batch runs without a graph)."""
    for b in buckets:
        if b >= n:
            return b
    return n


@contextlib.contextmanager
def _capturable():
    """While capturing: attend_mask without its data-dependent shortcut (`bool(pad_mask.any())` would sync the
    device, which a capture forbids). It computes the same values; nothing else in the forward syncs."""
    saved = backbone_mod.attend_mask, heads_mod.attend_mask
    backbone_mod.attend_mask = heads_mod.attend_mask = _always_mask
    try:
        yield
    finally:
        backbone_mod.attend_mask, heads_mod.attend_mask = saved


class StaticGraph:
    """`fn` on fixed-shape input buffers. Captured as a CUDA graph when `capture`, else run eagerly on the same
    buffers (the CPU path, and the reference the CUDA tests compare with). Returns `fn`'s outputs, which a
    captured graph overwrites on its next replay: copy them out before calling again."""

    def __init__(self, fn: Callable, example: tuple[torch.Tensor, ...], capture: bool, context: Callable) -> None:
        self.fn, self.context = fn, context
        self.inputs = tuple(x.clone() for x in example)
        self.graph = None
        if capture:
            stream = torch.cuda.Stream(device=self.inputs[0].device)
            stream.wait_stream(torch.cuda.current_stream(self.inputs[0].device))
            with torch.cuda.stream(stream), _capturable(), context():
                for _ in range(2):  # warm-up: cuBLAS handles and kernel selection happen outside the capture
                    fn(*self.inputs)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread may keep replaying the old graphs while a hot swap captures
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    self.outputs = fn(*self.inputs)
            torch.cuda.current_stream(self.inputs[0].device).wait_stream(stream)
            self.graph = graph

    def __call__(self, *inputs: torch.Tensor):
        for dst, src in zip(self.inputs, inputs, strict=True):
            dst.copy_(src, non_blocking=True)
        if self.graph is None:
            with self.context():
                return self.fn(*self.inputs)
        self.graph.replay()
        return self.outputs


class DeviceBackend(PolicyBackend):
    """The policy's forward on `device` (see the module docstring)."""

    kind = "device"

    def __init__(
        self,
        model,
        device: str = "cuda",
        precision: str = "fp32",
        graphs: bool | None = None,
        pad: bool | None = None,
        buckets: tuple[int, ...] = BUCKETS,
        warm_samples: tuple[int, ...] = (1, 4),
    ) -> None:
        """graphs: capture CUDA graphs (default: on CUDA). pad: pad batches to `buckets` (default: with graphs).
        warm_samples: flow-head sample counts whose graphs are captured up front (others on first use)."""
        super().__init__(model)
        if precision not in DEVICE_PRECISIONS:
            raise ValueError(
                f"precision: expected one of {DEVICE_PRECISIONS} on a device backend, got {precision!r}"
                + (" (int8 is the CPU backends' dynamic quantization)" if precision == "int8" else "")
            )
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        if precision == "fp16" and not cuda:
            raise ValueError("precision: 'fp16' runs on CUDA only; on the CPU use 'fp32' or 'bf16'")
        if graphs and not cuda:
            raise ValueError(f"graphs: CUDA graphs need a CUDA device, got {device!r}")
        self.precision = precision
        self.graphs = cuda if graphs is None else bool(graphs)
        self.pad = self.graphs if pad is None else bool(pad)
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.shares_model = False
        self.backbone = copy.deepcopy(model.backbone).to(self.device).eval()
        self._sync_token_rows()
        self.heads = {name: self._device_head(name) for name in model.specs}
        self._deltas = {name: self._device_delta(name) for name in model.specs}
        self._graphs: dict[tuple, StaticGraph] = {}
        self._graph_lock = threading.Lock()  # lazy captures vs a hot swap's captures
        self._pinned: dict[tuple, torch.Tensor] = {}
        self._device_generator = torch.Generator(device=self.device)
        self.captures = 0  # graphs captured so far (tests and the GPU bench read it)
        if self.graphs:
            self.warm(warm_samples)

    # ----- parts on the device -------------------------------------------------------------------------
    def _sync_token_rows(self) -> None:
        """The device backbone's own copy of the embodiment-token rows of bodies added after pretraining
        (the master's TokenRows map holds host tensors; FleetPolicy.add_embodiment)."""
        rows = getattr(self.model.backbone, "token_rows", {})
        self.backbone.token_rows = {i: r.detach().to(self.device) for i, r in rows.items()}

    def _device_head(self, name: str):
        return copy.deepcopy(self.model.head(name)).to(self.device).eval()

    def _device_delta(self, name: str) -> torch.Tensor | None:
        table = self._adapters(name)
        return None if table is None else table.to(self.device)

    def head(self, name: str):
        return self.heads[name]

    def stem(self, name: str):
        return self.heads[name].stem

    def _context(self):
        if self.precision == "fp32":
            return torch.inference_mode()
        # cache_enabled=False: a captured graph must not hold autocast's weight-cast cache from capture time
        autocast = torch.autocast(self.device.type, dtype=_DTYPES[self.precision], cache_enabled=False)
        return _Both(torch.inference_mode(), autocast)

    # ----- transfers -----------------------------------------------------------------------------------
    def _host(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        """A reusable host buffer shaped like `like` (pinned on CUDA, so the copy to the device is asynchronous)."""
        buf = self._pinned.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.device.type == "cuda")
            if len(self._pinned) > 256:  # bounded: shapes are few (buckets x fields)
                self._pinned.clear()
            self._pinned[key] = buf
        buf.copy_(like)
        return buf

    def _to_device(self, name: str, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """x (B, ...) host -> device, padded to `rows` by repeating row 0 (a real row: no NaN paths)."""
        if rows is not None and rows > x.shape[0]:
            x = torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])], 0)
        if self.device.type == "cpu":
            return x.contiguous()
        return self._host((name, tuple(x.shape), x.dtype), x).to(self.device, non_blocking=True)

    # ----- graphs ---------------------------------------------------------------------------------------
    def _runner(self, key: tuple, fn: Callable, example: tuple[torch.Tensor, ...]) -> StaticGraph:
        runner = self._graphs.get(key)
        if runner is None:
            with self._graph_lock:
                runner = self._graphs.get(key)
                if runner is None:
                    runner = self._graphs[key] = StaticGraph(fn, example, self.graphs, self._context)
                    self.captures += self.graphs
        return runner

    def _backbone_fn(self):
        vision, transformer = _Vision(self.backbone), _Transformer(self.backbone)

        def run(image, emb_ids, proprio_tok, instr_ids):
            memory, pad_mask, pooled = transformer(vision(image, instr_ids), emb_ids, proprio_tok, instr_ids)
            return memory.float(), pad_mask, pooled.float()

        return run

    def _head_fn(self, head, samples: int):
        if head.kind == "token":
            decode = _TokenDecode(head)

            def run_token(memory, pad_mask):
                actions, entropy, probs = decode(memory, pad_mask)
                return actions.float(), entropy.float(), probs.float()

            return run_token
        flow = _FlowSample(head)
        return lambda memory, pad_mask, noise: flow(memory, pad_mask, noise).float()

    def _examples(self, rows: int) -> tuple[torch.Tensor, ...]:
        cfg = self.model.config
        words = cfg.max_instr_len
        image = torch.zeros((rows, 64, 64, 3), dtype=torch.uint8, device=self.device)
        instr = torch.zeros((rows, words), dtype=torch.int64, device=self.device)
        instr[:, 0] = 1  # one real word, the rest padding: the masked path
        emb = torch.zeros(rows, dtype=torch.int64, device=self.device)
        proprio_tok = torch.zeros((rows, cfg.d_model), dtype=torch.float32, device=self.device)
        return image, emb, proprio_tok, instr

    def _head_examples(self, name: str, rows: int, samples: int) -> tuple[torch.Tensor, ...]:
        memory, pad_mask, _ = self._backbone(*self._examples(rows))
        memory, pad_mask = memory.clone(), pad_mask.clone()
        head = self.heads[name]
        if head.kind == "token":
            return memory, pad_mask
        noise = torch.zeros((rows * samples, head.chunk_size, head.action_dim), device=self.device)
        return memory, pad_mask, noise

    def _backbone(self, image, emb, proprio_tok, instr):
        rows = image.shape[0]
        if self.pad and rows in self.buckets:
            runner = self._runner(("backbone", rows), self._backbone_fn(), (image, emb, proprio_tok, instr))
            return runner(image, emb, proprio_tok, instr)
        with self._context():
            return self._backbone_fn()(image, emb, proprio_tok, instr)

    def _head_graph(self, name: str, head, rows: int, samples: int, graphs: dict | None = None) -> StaticGraph:
        key = ("head", name, rows, samples)
        store = self._graphs if graphs is None else graphs
        runner = store.get(key)
        if runner is None:
            example = self._head_examples(name, rows, samples)
            runner = StaticGraph(self._head_fn(head, samples), example, self.graphs, self._context)
            with self._graph_lock:
                store[key] = runner
                self.captures += self.graphs
        return runner

    def warm(self, samples: tuple[int, ...] = (1, 4)) -> int:
        """Capture the backbone's and every head's graphs for every bucket (flow heads for each of `samples`)."""
        before = self.captures
        for rows in self.buckets:
            self._backbone(*self._examples(rows))
            for name, head in self.heads.items():
                for k in samples if head.kind == "flow" else (1,):
                    self._head_graph(name, head, rows, k)
        return self.captures - before

    # ----- the forward -----------------------------------------------------------------------------------
    def _proprio_tokens(self, batch, proprio: torch.Tensor, groups: dict[str, torch.Tensor]) -> torch.Tensor:
        out = proprio.new_zeros(proprio.shape[0], self.model.config.d_model)
        with torch.inference_mode():
            for name, idx in groups.items():
                p = self.model.specs[name].proprio_dim
                out[idx] = self.heads[name].stem(proprio[idx, :p]).float()
        return out

    def _words(self, batch, instr: torch.Tensor, groups: dict[str, torch.Tensor]) -> torch.Tensor | None:
        tables = {n: self._deltas.get(n) for n in groups if self._deltas.get(n) is not None}
        if not tables:
            return None
        with torch.inference_mode():
            words = self.backbone.word_embed(instr)
            for name, table in tables.items():
                idx = groups[name]
                words[idx] += table[instr[idx]].to(words.dtype)
        return words

    def predict(self, batch, n_samples=1, temperature=0.0, generator=None, image_tokens=None):
        if n_samples < 1:
            raise ValueError(f"predict: n_samples must be >= 1, got {n_samples}")
        n = len(batch)
        rows = bucket(n, self.buckets) if self.pad else n
        host_groups = batch.groups()
        opts = {name: batch.head_options(self.model.specs[name], idx, n_samples) for name, idx in host_groups.items()}
        # the flow heads' noise, drawn on the host in FleetPolicy.predict's order (one draw per flow group); a
        # group with a committed prefix runs on the master head, which draws its own
        noises = {}
        for name, idx in host_groups.items():
            head = self.heads[name]
            if head.kind == "flow" and "prefix" not in opts[name]:
                shape = (len(idx) * n_samples, head.chunk_size, head.action_dim)
                noises[name] = torch.randn(shape, generator=generator)
        # one copy each way: the batch's fields in
        image = self._to_device("image", batch.image, rows)
        proprio = self._to_device("proprio", batch.proprio, rows)
        instr = self._to_device("instr", batch.instr_ids, rows)
        emb = self._to_device("emb", batch.emb_idx, rows)
        groups = {name: self._to_device(f"idx-{name}", idx) for name, idx in host_groups.items()}
        noises = {name: self._to_device(f"noise-{name}", x) for name, x in noises.items()}
        words = self._words(batch, instr, groups)
        proprio_tok = self._proprio_tokens(batch, proprio, groups)
        if words is None and image_tokens is None:
            memory, pad_mask, pooled = self._backbone(image, emb, proprio_tok, instr)
        else:  # word adapters or cached image tokens: eager (not the steady state the graphs are for)
            with self._context():
                if image_tokens is None:
                    tokens = self.backbone.vision_tokens(image, instr, words)
                else:
                    tokens = self._to_device("tokens", torch.as_tensor(image_tokens), rows)
                memory, pad_mask, pooled = self.backbone.transformer(tokens, emb, proprio_tok, instr, words=words)
            memory, pooled = memory.float(), pooled.float()
        outputs: list[tuple[str, str, tuple[int, ...]]] = []
        parts: list[torch.Tensor] = [pooled[:n].reshape(-1)]
        outputs.append(("", "features", (n, pooled.shape[-1])))
        on_host: dict[str, dict[str, np.ndarray]] = {}
        for name, idx in groups.items():
            if "prefix" in opts[name]:  # real-time chunking: the rule of every non-master backend (base.py)
                mem, mask = memory.index_select(0, idx).cpu().numpy(), pad_mask.index_select(0, idx).cpu().numpy()
                out = self._master_outputs(name, mem, mask, n_samples, temperature, generator, opts[name])
                on_host[name] = out | {"master": np.ones(len(idx), bool)}
                continue
            out = self._head(name, memory, pad_mask, idx, n_samples, temperature, generator, noises.get(name))
            ks = opts[name].get("row_samples")
            if ks is not None and "samples" in out:  # flow: each row's chunk from its own first K_i samples
                out = self._own_samples(name, out, ks)
            for key, value in out.items():
                parts.append(value.reshape(-1).float())
                outputs.append((name, key, tuple(value.shape)))
        flat = torch.cat(parts)
        host = flat.to("cpu", non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return self._rows(batch, host.numpy(), outputs, host_groups, n_samples, on_host)

    def _own_samples(self, name: str, out: dict[str, torch.Tensor], ks: list[int]) -> dict[str, torch.Tensor]:
        samples = out["samples"].clone()
        head = self.heads[name]
        chunks = []
        for i, k in enumerate(ks):
            chunks.append(head._execute(samples[i : i + 1, :k])[0])
            samples[i, k:] = float("nan")
        ks_t = torch.tensor(ks, dtype=torch.float32, device=samples.device)
        return {"chunk": torch.stack(chunks).clamp(-1.0, 1.0), "samples": samples, "row_samples": ks_t}

    def _head(self, name, memory, pad_mask, idx, n_samples, temperature, generator, noise) -> dict[str, torch.Tensor]:
        head = self.heads[name]
        m = idx.shape[0]
        q = bucket(m, self.buckets) if self.pad else m
        sel = idx if q == m else torch.cat([idx, idx[:1].expand(q - m)])
        mem, mask = memory.index_select(0, sel), pad_mask.index_select(0, sel)
        if head.kind == "token" and temperature > 0.0:  # sampling: eager, from a device generator the caller seeds
            seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
            gen = self._device_generator.manual_seed(seed) if seed is not None else None
            with self._context():
                out = head.decode(mem[:m], mask[:m], temperature, gen)
            return {"chunk": out.actions, "entropy": out.entropy, "probs": out.probs}
        graphed = self.pad and q in self.buckets
        if head.kind == "token":
            if graphed:
                actions, entropy, probs = self._head_graph(name, head, q, 1)(mem, mask)
            else:
                with self._context():
                    actions, entropy, probs = self._head_fn(head, 1)(mem, mask)
            return {"chunk": actions[:m], "entropy": entropy[:m], "probs": probs[:m]}
        if q > m:
            noise = torch.cat([noise, noise.new_zeros(((q - m) * n_samples, *noise.shape[1:]))])
        if graphed:
            samples = self._head_graph(name, head, q, n_samples)(mem, mask, noise)
        else:
            with self._context():
                samples = self._head_fn(head, n_samples)(mem, mask, noise)
        samples = samples[:m]
        return {"chunk": head._execute(samples).clamp(-1.0, 1.0), "samples": samples}

    def _rows(self, batch, host: np.ndarray, outputs, groups, n_samples: int, on_host: dict) -> list[dict]:
        views: dict[str, dict[str, np.ndarray]] = {name: dict(out) for name, out in on_host.items()}
        at = 0
        for name, key, shape in outputs:
            size = int(np.prod(shape))
            views.setdefault(name, {})[key] = host[at : at + size].reshape(shape)
            at += size
        features = views[""]["features"]
        rows: list[dict] = [{} for _ in range(len(batch))]
        for name, idx in groups.items():
            self.group_rows(rows, name, idx.tolist(), views[name], features, n_samples)
        return rows

    # ----- stages, for callers that run them one by one (the encoder cache) -------------------------------
    def image_tokens(self, image, instr_ids, words=None) -> np.ndarray:
        with self._context():
            tokens = self.backbone.vision_tokens(
                torch.as_tensor(image).to(self.device), torch.as_tensor(instr_ids).to(self.device), words
            )
        return tokens.float().cpu().numpy()

    # ----- head swaps --------------------------------------------------------------------------------------
    def prepare_head(self, name: str):
        """The new head on the device and its graphs for every shape captured so far (off the serving path)."""
        head = self._device_head(name)
        graphs: dict = {}
        if self.graphs:
            for key in [k for k in self._graphs if k[0] == "head" and k[1] == name]:
                self._head_graph(name, head, key[2], key[3], graphs)
        return head, self._device_delta(name), graphs

    def install_head(self, name: str, prepared, version: int) -> None:
        head, delta, graphs = prepared
        with self._graph_lock:
            self.heads[name] = head
            self._deltas[name] = delta
            for key in [k for k in self._graphs if k[0] == "head" and k[1] == name]:
                del self._graphs[key]
            self._graphs.update(graphs)
            if getattr(self.model, "is_added", lambda n: False)(name):
                # a body added to the running fleet (or a new version of one): its token row lives in its head,
                # and the backbone's graphs read the rows they were captured with; capture them again lazily
                self._sync_token_rows()
                for key in [k for k in self._graphs if k[0] == "backbone"]:
                    del self._graphs[key]
        super().install_head(name, prepared, version)

    def close(self) -> None:
        self._graphs.clear()
        self._pinned.clear()


class _Both:
    """Two context managers as one (inference mode + autocast)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __enter__(self):
        self.first.__enter__()
        self.second.__enter__()

    def __exit__(self, *exc):
        self.second.__exit__(*exc)
        return self.first.__exit__(*exc)
