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
        self, name: str, memory: np.ndarray, pad_mask: np.ndarray, n_samples: int, temperature: float, generator
    ) -> dict[str, np.ndarray]:
        """-> {"chunk": (B, T, D) normalized in [-1, 1]; token heads: entropy, probs; flow heads: samples}."""
        raise NotImplementedError

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
            out = self.head_outputs(name, memory[sel], pad_mask[sel], n_samples, temperature, generator)
            chunks = self.model.denormalize_actions(name, out["chunk"])
            version = self.model.head_versions[name] if self.shares_model else self._versions[name]
            for j, i in enumerate(sel.tolist()):
                row = {"chunk": chunks[j], "features": pooled[i], "head_version": version, "embodiment": name}
                if "entropy" in out:
                    row["entropy"], row["probs"] = out["entropy"][j], out["probs"][j]
                if "samples" in out and n_samples > 1:
                    row["samples"] = out["samples"][j]
                rows[i] = row
        return rows

    def close(self) -> None:
        """Release what the backend holds (sessions, files)."""
