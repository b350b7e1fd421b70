"""Word adapters: per-head vectors added to the embeddings of words pretraining never saw (no Ray)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fleet.learning.candidate_gate import head_loss  # noqa: E402
from fleet.learning.head_adapter import HeadAdapter  # noqa: E402
from fleet.learning.round_config import AdaptConfig  # noqa: E402
from fleet.policy.checkpoint import head_from_bytes, head_to_bytes, load_checkpoint, save_checkpoint  # noqa: E402
from fleet.policy.demos import collect  # noqa: E402
from fleet.policy.inference.backend import TorchBackend  # noqa: E402
from fleet.policy.train import build_model  # noqa: E402
from tests.mocks.tiny_policy import TINY  # noqa: E402
from tests.unit.learning.test_adapt import corrections  # noqa: E402

KP = replace(TINY, keypoints=2)  # keypoints on: the instruction also FiLM-conditions the vision encoder


def tiny(seed: int = 0):
    return build_model(("franka", "aloha"), seed=seed, config=KP).eval()


def obs(instruction: str, seed: int, proprio_dim: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(proprio_dim).astype(np.float32),
        "instruction": instruction,
    }


def mixed(model):
    rows = [
        ("franka", "pick up the red cube"),
        ("franka", "pick up the purple star"),
        ("aloha", "lift the purple bar with both arms"),
    ]
    return model.collate([obs(t, i, model.specs[n].proprio_dim) for i, (n, t) in enumerate(rows)], [n for n, _ in rows])


def test_a_heads_word_adapters_change_only_its_rows_that_use_the_word():
    model = tiny()
    batch = mixed(model)
    with torch.no_grad():
        before = model.encode(batch)[0].clone()
        purple = model.vocab.token_id("purple")
        model.head("franka").word_delta[purple] = torch.randn(KP.d_model)
        after = model.encode(batch)[0]
    assert torch.equal(after[0], before[0])  # franka, known words only: bit-identical
    assert not torch.allclose(after[1], before[1])  # franka, "purple": changed
    assert torch.equal(after[2], before[2])  # aloha's head has no adapters: bit-identical
    assert model.word_vectors(model.collate([obs("lift the purple bar", 0, 16)], ["aloha"])) is None


def test_word_adapters_travel_with_checkpoints_and_head_payloads(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.head("franka").word_delta[model.vocab.token_id("cyan")] = torch.randn(KP.d_model)
    save_checkpoint(model, tmp_path / "p")
    loaded, _ = load_checkpoint(tmp_path / "p")
    assert torch.equal(loaded.head("franka").word_delta, model.head("franka").word_delta)

    other = tiny(seed=1)
    head_from_bytes(other, "franka", head_to_bytes(model, "franka", version=2))
    assert torch.equal(other.head("franka").word_delta, model.head("franka").word_delta)

    # a checkpoint written before heads had word adapters loads with empty ones
    tensors = load_file(str(tmp_path / "p.safetensors"))
    old = {k: v for k, v in tensors.items() if not k.endswith("word_delta")}
    assert len(old) == len(tensors) - 2
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(old, str(tmp_path / "p.safetensors"), metadata=meta)
    legacy, _ = load_checkpoint(tmp_path / "p")
    assert not legacy.head("franka").word_delta.any()


def test_a_staged_backend_serves_the_installed_adapters():
    model = tiny()
    batch = mixed(model)
    backend = TorchBackend(model, "bf16")  # holds its own copy of the heads: adapters come with install_head
    assert backend.word_vectors(batch) is None and not backend.has_word_adapters(["franka"])
    with torch.no_grad():
        model.head("franka").word_delta[model.vocab.token_id("purple")] = torch.randn(KP.d_model)
    assert backend.word_vectors(batch) is None  # not installed yet: the backend serves the old head
    backend.install_head("franka", backend.prepare_head("franka"), 2)
    words = backend.word_vectors(batch)
    assert words is not None and backend.has_word_adapters(["franka", "aloha"])
    assert torch.equal(words, model.word_vectors(batch))

    shared = TorchBackend(model, "fp32")  # runs the master: the staged path (encoder cache) equals predict
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    tokens = shared.image_tokens(batch.image, batch.instr_ids, shared.word_vectors(batch))
    staged = shared.predict(batch, n_samples=2, generator=gen(), image_tokens=tokens)
    direct = model.predict(batch, n_samples=2, generator=gen())
    for a, b in zip(staged, direct, strict=True):
        np.testing.assert_allclose(a["chunk"], b["chunk"], atol=1e-5)


def test_the_adapter_learns_only_words_the_rehearsal_set_never_uses():
    model = tiny()
    rehearsal = collect("franka", 12, seed=3)
    novel = collect("franka", 6, seed=4, shift="novel_object")
    known = {w for t in rehearsal.instructions for w in t.split()}
    unseen = {w for t in novel.instructions for w in t.split()} - known
    assert unseen  # novel_object names colours and shapes pretraining never shows
    cfg = AdaptConfig(steps=40, batch_size=16, lr=1e-3, word_lr=1e-2, max_round_seconds=None, holdout=0.0)
    adapter = HeadAdapter(model, "franka", rehearsal, cfg)
    rehearsal_memory = adapter.data.rehearsal_train.memory.clone()
    result = adapter.round(corrections(novel, range(len(novel)), shift="novel_object"))
    assert set(result.metrics["adapted_words"]) == unseen
    delta = result.state["word_delta"]
    ids = [model.vocab.token_id(w) for w in unseen]
    assert all(bool(delta[i].any()) for i in ids)
    others = torch.ones(len(delta), dtype=torch.bool)
    others[ids] = False
    assert not delta[others].any()  # every other word's row is still exactly zero

    # the adapters lower the loss on the corrections they were trained on, for the same candidate head
    adapter.accept(result, version=2)
    data = adapter.data.earlier
    with_words = head_loss(model.head("franka"), adapter.words.reencode(data, model.head("franka").word_delta), seed=0)
    without = head_loss(model.head("franka"), adapter.words.reencode(data, torch.zeros_like(delta)), seed=0)
    assert with_words < without

    # instructions of known words encode exactly as before
    fresh = HeadAdapter(model, "franka", rehearsal, cfg)
    assert torch.equal(fresh.data.rehearsal_train.memory, rehearsal_memory)


def test_the_onnx_backend_runs_adapted_rows_through_the_master_model():
    pytest.importorskip("onnxruntime")
    from fleet.policy.inference.onnx_backend import OnnxBackend  # onnxruntime: only once the skip above passed

    model = tiny()
    batch = mixed(model)
    backend = OnnxBackend(model, precision="fp32", threads=1)
    with torch.no_grad():
        model.head("franka").word_delta[model.vocab.token_id("purple")] = torch.randn(KP.d_model)
    backend.install_head("franka", backend.prepare_head("franka"), 2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    served = backend.predict(batch, n_samples=2, generator=gen())
    direct = model.predict(batch, n_samples=2, generator=gen())
    for a, b in zip(served, direct, strict=True):
        np.testing.assert_allclose(a["chunk"], b["chunk"], atol=1e-3)
