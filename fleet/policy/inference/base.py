"""PolicyBackend: the interface every policy backend implements, and the staged forward they share.

A backend answers `predict(batch, n_samples, temperature, generator, image_tokens=None)` exactly like
`FleetPolicy.predict`; subclasses supply the stages (image_tokens, transform, head_outputs) and, when they
hold their own copy of the heads, the head-swap hooks. TorchBackend (backend.py) and OnnxBackend
(onnx_backend.py) both build on this module, which imports neither.
"""

from __future__ import annotations

import numpy as np
import torch


class PolicyBackend:
    """Base: the staged forward and FleetPolicy.predict's reply rows on top of four stage methods."""

    kind = "base"
    precision = "fp32"
    shares_model = False  # True: runs the master model itself (head swaps need no refresh)

    def __init__(self, model) -> None:
        self.model = model
        self._versions = dict(model.head_versions)  # what this backend serves (a swap installs it last)
        self._word_deltas = {name: self._adapters(name) for name in model.specs}  # installed with the heads

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.precision}"

    # ----- stages (subclasses) -------------------------------------------------------------------------
    def stem(self, name: str):
        return self.model.head(name).stem

    def proprio_tokens(self, batch) -> torch.Tensor:
        """(B, d) float32: each row's proprio through its embodiment's stem (fp32 torch in every backend)."""
        out = batch.proprio.new_zeros(len(batch), self.model.config.d_model)
        with torch.inference_mode():
            for name, idx in batch.groups().items():
                p = self.model.specs[name].proprio_dim
                out = out.index_copy(0, idx, self.stem(name)(batch.proprio.index_select(0, idx)[:, :p]).float())
        return out

    def _adapters(self, name: str) -> torch.Tensor | None:
        """A copy of head `name`'s word-adapter table in the master model, or None when it is all zero."""
        table = getattr(self.model.head(name), "word_delta", None)
        return None if table is None or not bool(table.any()) else table.detach().clone()

    def word_vectors(self, batch) -> torch.Tensor | None:
        """(B, L, d) float32 word vectors with the served heads' word adapters, or None when no row has any."""
        with torch.inference_mode():
            if self.shares_model:
                return self.model.word_vectors(batch)
            return self.model.word_vectors(batch, {n: self._word_deltas.get(n) for n in batch.groups()})

    def has_word_adapters(self, names) -> bool:
        """Whether any of embodiments `names` is served with word adapters (their image tokens then depend on
        the head version, so per-robot encoder caching is skipped for them)."""
        if self.shares_model:
            return any(bool(self.model.head(n).word_delta.any()) for n in set(names))
        return any(self._word_deltas.get(n) is not None for n in set(names))

    def image_tokens(
        self,
        image: np.ndarray | torch.Tensor,
        instr_ids: np.ndarray | torch.Tensor,
        words: torch.Tensor | None = None,
    ) -> np.ndarray:
        raise NotImplementedError

    def transform(
        self,
        tokens: np.ndarray,
        emb_idx: torch.Tensor,
        proprio_tok: torch.Tensor,
        instr_ids: torch.Tensor,
        words: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def head_outputs(
        self,
        name: str,
        memory: np.ndarray,
        pad_mask: np.ndarray,
        n_samples: int,
        temperature: float,
        generator,
        row_samples: list[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """-> {"chunk": (B, T, D) normalized in [-1, 1]; token heads: entropy, probs; flow heads: samples}.
        row_samples: each row's own K (flow heads; then samples is (B, max K, T, D), NaN past a row's K, and
        `row_samples` (B,) is returned)."""
        raise NotImplementedError

    def prefixed_outputs(
        self, name: str, memory: np.ndarray, pad_mask: np.ndarray, n_samples: int, temperature: float, generator, opts
    ) -> dict[str, np.ndarray]:
        """head_outputs for a group in which some rows carry a committed prefix (real-time chunking).

        The rule for every backend: rows with a prefix run the fp32 master head, eager torch (guidance needs
        a vector-Jacobian product, forcing needs the decode loop; an exported graph or a quantized copy has
        neither); rows without one run this backend's own head_outputs, as they would without batch mates.
        A backend that runs the master itself (`shares_model`) runs the whole group there in one call."""
        prefix, row_samples = opts["prefix"], opts.get("row_samples")
        b = memory.shape[0]
        ks = np.asarray(row_samples if row_samples is not None else [n_samples] * b, np.int64)
        if self.shares_model:
            return self._master_outputs(name, memory, pad_mask, n_samples, temperature, generator, opts)
        with_prefix = prefix.rows.numpy()
        parts: list[tuple[np.ndarray, dict]] = []
        plain = np.flatnonzero(~with_prefix)
        if plain.size:
            ks_plain = ks[plain].tolist()
            same = all(k == n_samples for k in ks_plain)
            out = self.head_outputs(
                name, memory[plain], pad_mask[plain], n_samples, temperature, generator, None if same else ks_plain
            )
            parts.append((plain, out))
        guided = np.flatnonzero(with_prefix)
        sub = {"prefix": prefix.select(torch.from_numpy(guided)), "row_samples": ks[guided].tolist()}
        out = self._master_outputs(name, memory[guided], pad_mask[guided], n_samples, temperature, generator, sub)
        parts.append((guided, out | {"master": np.ones(guided.size, bool)}))
        return _merge_rows(parts, b, ks)

    def _master_outputs(self, name, memory, pad_mask, n_samples, temperature, generator, opts) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.model.head(name).predict(
                torch.from_numpy(memory), torch.from_numpy(pad_mask), n_samples, temperature, generator, **opts
            )
        return {k: v.numpy() for k, v in out.items()}

    # ----- head swaps ----------------------------------------------------------------------------------
    def head_versions(self) -> dict[str, int]:
        """{embodiment: version of the head this backend runs}."""
        return dict(self.model.head_versions) if self.shares_model else dict(self._versions)

    def prepare_head(self, name: str):
        """Build head `name`'s runnable form from the master model (may be slow; no lock needed)."""
        return None

    def install_head(self, name: str, prepared, version: int) -> None:
        """Swap in what prepare_head built (fast; the runtime holds its forward lock)."""
        self._versions[name] = version
        self._word_deltas[name] = self._adapters(name)

    # ----- the composed forward ------------------------------------------------------------------------
    def encode(self, batch, image_tokens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """memory (B, S, d), pad_mask (B, S), pooled (B, d) as numpy; image_tokens (B, N, d) skips the encoder."""
        words = self.word_vectors(batch)
        if image_tokens is None:
            image_tokens = self.image_tokens(batch.image, batch.instr_ids, words)
        return self.transform(image_tokens, batch.emb_idx, self.proprio_tokens(batch), batch.instr_ids, words)

    def predict(
        self,
        batch,
        n_samples: int = 1,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        image_tokens: np.ndarray | None = None,
    ) -> list[dict]:
        """FleetPolicy.predict's rows: chunk (T, D) physical, features, head_version, embodiment, and
        entropy/probs (token heads) or samples (flow heads, n_samples > 1)."""
        if n_samples < 1:
            raise ValueError(f"predict: n_samples must be >= 1, got {n_samples}")
        memory, pad_mask, pooled = self.encode(batch, image_tokens)
        rows: list[dict] = [{} for _ in range(len(batch))]
        for name, idx in batch.groups().items():
            sel = idx.numpy()
            opts = batch.head_options(self.model.specs[name], idx, n_samples)  # per-row K, prefixes
            if "prefix" in opts:
                out = self.prefixed_outputs(name, memory[sel], pad_mask[sel], n_samples, temperature, generator, opts)
            else:
                out = self.head_outputs(name, memory[sel], pad_mask[sel], n_samples, temperature, generator, **opts)
            self.group_rows(rows, name, sel, out, pooled, n_samples)
        return rows

    def group_rows(self, rows: list[dict], name: str, sel, out: dict, features, n_samples: int) -> None:
        """Fill rows[i] for the rows `sel` of head `name` from its outputs `out` (numpy, normalized chunks):
        chunk (physical), features[i], head_version, embodiment; entropy/probs; each row's own samples."""
        ks = out["row_samples"].astype(int).tolist() if "row_samples" in out else [n_samples] * len(sel)
        master = out.get("master", np.zeros(len(sel), bool))
        chunks = self.model.denormalize_actions(name, out["chunk"])
        version = self.model.head_versions[name] if self.shares_model else self._versions[name]
        for j, i in enumerate(list(sel)):
            # a row run on the master head reports the master's version (they differ only mid head swap)
            v = self.model.head_versions[name] if master[j] else version
            row = {"chunk": chunks[j], "features": features[i], "head_version": v, "embodiment": name}
            if "entropy" in out:
                row["entropy"], row["probs"] = out["entropy"][j], out["probs"][j]
            if "samples" in out and ks[j] > 1:
                row["samples"] = out["samples"][j, : ks[j]]
            rows[i] = row

    def close(self) -> None:
        """Release what the backend holds (sessions, files)."""


def _merge_rows(parts: list[tuple[np.ndarray, dict]], b: int, ks: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of disjoint row subsets (rows, {key: (n, ...)}) -> one dict over all b rows. samples are padded
    to the largest K with NaN; row_samples (B,) and master (B,) bool are always present."""
    merged: dict[str, np.ndarray] = {"row_samples": ks.astype(np.int64), "master": np.zeros(b, bool)}
    for rows, out in parts:
        for key, value in out.items():
            if key == "row_samples":
                continue
            if key not in merged:
                shape = (b, int(ks.max()), *value.shape[2:]) if key == "samples" else (b, *value.shape[1:])
                fill = np.nan if value.dtype.kind == "f" else 0
                merged[key] = np.full(shape, fill, value.dtype)
            if key == "samples":
                merged[key][rows, : value.shape[1]] = value
            else:
                merged[key][rows] = value
    return merged
