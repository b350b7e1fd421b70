"""The policy server's engine without Ray: validate a batch of act requests, run the model once, reply.

`deployments/policy.py` wraps `PolicyRuntime` in a Ray Serve deployment; tests and benchmarks use it
directly. Its configuration, `ServeConfig`, lives in fleet/serving/config.py (no torch).

    runtime = PolicyRuntime("fleet/checkpoints/policy", threads=2)
    replies = runtime.act_batch([make_request("r0", "franka", obs), ...])   # one forward for all rows

`backend` / `precision` pick how the model runs (eager torch fp32 / bf16 / int8, or ONNX Runtime fp32 / int8:
fleet/policy/inference/backend.py); `encoder_cache` reuses a robot's image tokens while its frame is unchanged.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from fleet.learning.head_check import check_head_payload
from fleet.policy.batch import PolicyBatch
from fleet.policy.checkpoint import head_from_bytes
from fleet.policy.default import load_policy
from fleet.policy.inference.backend import make_backend
from fleet.policy.inference.encoder_cache import EncoderCache
from fleet.protocol import RequestError, validate_request
from fleet.validate import check_int


def _percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


class PolicyRuntime:
    """One replica's model: batched, validated inference and atomic head swaps. Thread-safe."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model=None,
        threads: int = 2,
        max_batch: int = 64,
        seed: int = 0,
        backend: str = "torch",
        precision: str = "fp32",
        encoder_cache: bool | int = False,
        device: str = "cpu",
        cuda_graphs: bool = True,
    ) -> None:
        """backend/precision: how the model runs (fleet.policy.inference.backend.make_backend); `model` stays the fp32
        master the heads are validated and swapped into. encoder_cache: False, True (4096 robots) or a
        number of robots to remember."""
        if model is None:
            model, _ = load_policy(checkpoint)
        if threads >= 1:
            torch.set_num_threads(int(threads))
        self.model = model.eval()
        self.backend = make_backend(
            self.model, backend, precision, threads=max(1, int(threads)), device=device, graphs=cuda_graphs
        )
        self.device = device
        robots = 4096 if encoder_cache is True else int(encoder_cache)
        self.encoder_cache = EncoderCache(robots) if robots else None
        self.max_batch = int(max_batch)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        vocab, specs = model.vocab, model.specs
        self._emb_ids = {name: vocab.token_id(spec.token) for name, spec in specs.items()}
        self._proprio_width = max(spec.proprio_dim for spec in specs.values())
        self._instr_len = model.config.max_instr_len
        self._instr_ids: dict[str, np.ndarray] = {}
        # one lock for forward passes and head swaps: a batch runs entirely on the old head or the new one
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()  # one head swap at a time (a backend may prepare it outside _lock)
        self._generator = torch.Generator().manual_seed(seed)
        self._stats_lock = threading.Lock()
        self._counts = {"requests": 0, "batches": 0, "rows": 0, "rejected": 0, "failed": 0, "head_swaps": 0}
        self._infer_ms: deque[float] = deque(maxlen=2048)
        self._consecutive_failures = 0
        self.last_error: str | None = None
        self._image_adapters: dict = {}  # robot id -> (ImageAdapter, its dict for replies, made once)
        self.image_adapters_version = 0

    # ----- inference -----------------------------------------------------------------------------
    def act_batch(self, requests: list[dict]) -> list[dict]:
        """One reply per request, in order. A malformed request gets `{"error": "<field>: <problem>",
        "request_id"}` and the others are still served; the model runs once per `max_batch` valid rows."""
        replies: list[dict | None] = [None] * len(requests)
        valid: list[tuple[int, dict]] = []
        adapted: dict[int, dict] = {}  # request index -> the image adapter its frame went through
        for i, raw in enumerate(requests):
            try:
                request = validate_request(raw, self.model.specs)
                served = self._image_adapters.get(request.get("robot_id"))
                if served is not None:  # this robot's camera, mapped back onto the rig's (fleet.policy.image_adapter)
                    request["image"] = served[0].apply(request["image"])
                    adapted[i] = served[1]
                valid.append((i, request))
            except RequestError as exc:
                replies[i] = self._reject(raw, str(exc))
            except Exception as exc:  # noqa: BLE001 - a request must never crash the replica
                replies[i] = self._reject(raw, f"request: {type(exc).__name__}: {exc}")
        for start in range(0, len(valid), self.max_batch):
            part = valid[start : start + self.max_batch]
            for (i, _), reply in zip(part, self._forward([r for _, r in part]), strict=True):
                replies[i] = reply
        for i, adapter in adapted.items():  # the robot scores its frame's novelty as the policy read it
            if replies[i] is not None and "error" not in replies[i]:
                replies[i]["image_adapter"] = adapter
        with self._stats_lock:
            self._counts["requests"] += len(requests)
        return replies  # type: ignore[return-value]

    def _reject(self, raw: object, message: str) -> dict:
        with self._stats_lock:
            self._counts["rejected"] += 1
        rid = raw.get("request_id") if isinstance(raw, dict) else None
        return {"error": message, "request_id": rid if isinstance(rid, str | int) else None}

    def _encode_instruction(self, text: str) -> np.ndarray:
        ids = self._instr_ids.get(text)
        if ids is None:
            if len(self._instr_ids) > 4096:  # instructions are few; bound the cache against a flood of unique ones
                self._instr_ids.clear()
            ids = self._instr_ids[text] = self.model.vocab.encode(text, self._instr_len)
        return ids

    def _batch(self, rows: list[dict]):
        """PolicyBatch straight from validated requests: numpy stacks, one torch.from_numpy per field."""
        b = len(rows)
        proprio = np.zeros((b, self._proprio_width), np.float32)
        for i, r in enumerate(rows):
            proprio[i, : r["proprio"].shape[0]] = r["proprio"]
        return PolicyBatch(
            image=torch.from_numpy(np.stack([r["image"] for r in rows])),
            proprio=torch.from_numpy(proprio),
            instr_ids=torch.from_numpy(np.stack([self._encode_instruction(r["instruction"]) for r in rows])),
            emb_idx=torch.from_numpy(np.array([self._emb_ids[r["embodiment"]] for r in rows], np.int64)),
            embodiments=[r["embodiment"] for r in rows],
            n_samples=[r["n_samples"] for r in rows],  # each row draws its own K (PolicyBatch.head_options)
            prefix=[None if r.get("prefix") is None else (r["prefix"], r["prefix_delay"]) for r in rows],
        )

    def _forward(self, rows: list[dict]) -> list[dict]:
        specs = self.model.specs
        flow_k = [r["n_samples"] for r in rows if specs[r["embodiment"]].head == "flow"]
        n_samples = max(flow_k, default=1)
        try:
            batch = self._batch(rows)
            with self._lock:
                t0 = time.perf_counter()
                tokens = None
                # rows of heads with word adapters skip the cache: their tokens depend on the head version
                if self.encoder_cache is not None and not self.backend.has_word_adapters(batch.embodiments):
                    tokens = self.encoder_cache.tokens(
                        [r["robot_id"] for r in rows],
                        batch.image.numpy(),
                        batch.instr_ids.numpy(),
                        self.backend.image_tokens,
                    )
                outs = self.backend.predict(batch, n_samples=n_samples, generator=self._generator, image_tokens=tokens)
                infer_ms = (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # noqa: BLE001 - report to every row of this batch, keep serving
            with self._stats_lock:
                self._counts["failed"] += len(rows)
                self._consecutive_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return [{"error": f"internal: {self.last_error}", "request_id": r["request_id"]} for r in rows]
        with self._stats_lock:
            self._counts["batches"] += 1
            self._counts["rows"] += len(rows)
            self._infer_ms.append(infer_ms)
            self._consecutive_failures = 0
        timing = {"infer_ms": infer_ms, "batch_size": len(rows), "replica": self.replica_id}
        n_bins = self.model.config.n_bins
        replies = []
        for r, out in zip(rows, outs, strict=True):
            reply = {
                "chunk": out["chunk"],
                "head_version": int(out["head_version"]),
                "embodiment": r["embodiment"],
                "robot_id": r["robot_id"],
                "obs_tick": r["obs_tick"],
                "request_id": r["request_id"],
                "features": out["features"],
                "server_timing": dict(timing),
            }
            if "entropy" in out:
                reply["entropy"], reply["n_bins"] = out["entropy"], n_bins
            k = r["n_samples"]
            if "samples" in out and k > 1:
                reply["samples"] = out["samples"][:k]  # the row's own k samples (its chunk is their mean)
            replies.append(reply)
        return replies

    # ----- heads ---------------------------------------------------------------------------------
    def set_head(self, name: str, version: int, payload: bytes) -> int:
        """Install head `name` at `version` from safetensors bytes (`head_to_bytes`); returns `version`.

        `version` is authoritative (a rollback re-publishes old weights under a new number). Refuses a
        version not above the serving one and any payload that does not fit the model (ValueError, old
        head kept): `check_head_payload` first (metadata types, the model's spec, finite weights, the serving
        head's tensor names and shapes), then the loader's own checks. The swap waits for the running batch:
        no batch mixes two versions of a head."""
        if name not in self.model.specs:
            raise ValueError(f"set_head: no head {name!r}; this model has {sorted(self.model.specs)}")
        check_int(f"set_head {name!r}: version", version, expected="an int")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ValueError(f"set_head {name!r}: payload must be safetensors bytes, got {type(payload).__name__}")
        serving = {k: tuple(v.shape) for k, v in self.model.head_state_dict(name).items()}
        spec = self.model.specs[name].to_dict()
        check_head_payload(bytes(payload), name, spec=spec, reference={"spec": spec, "tensors": serving})
        with self._swap_lock:
            if self.backend.shares_model:  # the backend runs the master model: swap it between two batches
                with self._lock:
                    self._check_newer(name, version)
                    head_from_bytes(self.model, name, bytes(payload))  # validates fully before touching the head
                    self.model.head_versions[name] = version
            else:
                # load into the master (the backend keeps serving its own copy), build the backend's form of
                # the new head outside the forward lock (an ONNX export takes seconds), then swap it in
                with self._lock:
                    self._check_newer(name, version)
                    old_state, old_version = self.model.head_state_dict(name), self.model.head_versions[name]
                    head_from_bytes(self.model, name, bytes(payload))
                    self.model.head_versions[name] = version
                try:
                    prepared = self.backend.prepare_head(name)
                except Exception:
                    with self._lock:
                        self.model.load_head_state_dict(name, old_state, old_version)
                    raise
                with self._lock:
                    self.backend.install_head(name, prepared, version)
        with self._stats_lock:
            self._counts["head_swaps"] += 1
        return version

    def _check_newer(self, name: str, version: int) -> None:
        current = self.model.head_versions[name]
        if version <= current:
            raise ValueError(f"set_head {name!r}: version {version} is not newer than the serving {current}")

    def set_image_adapters(self, adapters: dict[str, dict], version: int) -> int:
        """Serve robot id -> ImageAdapter dict (the whole table; validated, all or nothing) from now on, as table
        `version`; returns it. Rows of robots without an entry are untouched, bit for bit."""
        from fleet.policy.image_adapter import ImageAdapter

        check_int("set_image_adapters: version", version, lo=0, expected="an int >= 0")
        if not isinstance(adapters, dict):
            raise ValueError(f"set_image_adapters: expected a dict robot id -> adapter, got {type(adapters).__name__}")
        table = {}
        for robot_id, d in adapters.items():
            try:
                adapter = ImageAdapter.from_dict(d)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"set_image_adapters: robot {robot_id!r}: {exc}") from None
            if not adapter.is_identity:
                table[str(robot_id)] = adapter
        # replies carry each robot's adapter as a dict: made here once, not per request
        self._image_adapters = {r: (a, a.to_dict()) for r, a in table.items()}  # one assignment: atomic
        self.image_adapters_version = int(version)
        return int(version)

    def image_adapters(self) -> dict[str, dict]:
        """{robot id: ImageAdapter dict} served now."""
        return {r: dict(d) for r, (_, d) in self._image_adapters.items()}

    def head_versions(self) -> dict[str, int]:
        """{embodiment: serving head version}."""
        with self._lock:
            return {k: int(v) for k, v in self.backend.head_versions().items()}

    # ----- observability -------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters and inference timing since start (infer_ms over the last 2048 batches)."""
        with self._stats_lock:
            counts = dict(self._counts)
            infer = list(self._infer_ms)
        batches = counts["batches"]
        return counts | {
            "mean_batch_size": counts["rows"] / batches if batches else None,
            "infer_ms_p50": _percentile(infer, 50),
            "infer_ms_p90": _percentile(infer, 90),
            "infer_ms_p99": _percentile(infer, 99),
            "replica": self.replica_id,
            "threads": torch.get_num_threads(),
            "backend": self.backend.name,
            "device": self.device,
            "encoder_cache": None if self.encoder_cache is None else self.encoder_cache.stats(),
            "image_adapters": {"version": self.image_adapters_version, "robots": sorted(self._image_adapters)},
        }

    def health(self) -> dict:
        """{"ok", "replica", "heads", "last_error"}: not ok after 3 failed forward passes in a row."""
        ok = self._consecutive_failures < 3
        return {"ok": ok, "replica": self.replica_id, "heads": self.head_versions(), "last_error": self.last_error}
