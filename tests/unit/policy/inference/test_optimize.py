"""Inference optimizations are equivalences: quantized and ONNX outputs within tolerance of eager fp32,
the encoder cache's hits equal its misses, merged LoRA equals unmerged. Nothing here times anything."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import head_to_bytes
from fleet.policy.inference.backend import BACKENDS, TorchBackend, make_backend
from fleet.policy.inference.encoder_cache import EncoderCache
from fleet.policy.inference.lora import (
    add_lora,
    has_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    remove_lora,
)
from fleet.policy.inference.onnx_backend import OnnxBackend
from fleet.policy.inference.precision import PRECISIONS, convert_module, precision_context
from fleet.policy.train import build_model
from fleet.protocol import make_request
from fleet.serving.config import BACKENDS as SERVE_BACKENDS
from fleet.serving.config import PRECISIONS as SERVE_PRECISIONS
from fleet.serving.config import ServeConfig
from fleet.serving.runtime import PolicyRuntime
from tests.mocks.tiny_policy import TINY

NAMES = ("franka", "aloha", "hello", "leap")
# the shipped model's shape in miniature: keypoint tokens (instruction FiLM, direct path), no conv stem
TINY_KP = dataclasses.replace(TINY, keypoints=2, conv_stem=False)


def observation(name: str, seed: int, instruction: str = "pick up the red cube") -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(EMBODIMENTS[name].proprio_dim).astype(np.float32),
        "instruction": instruction,
    }


def mixed_batch(model, n: int = 8, seed: int = 0):
    names = [NAMES[i % len(NAMES)] for i in range(n)]
    obs = [
        observation(name, seed + i, "stack the blue block" if i % 3 else "pick up the red cube")
        for i, name in enumerate(names)
    ]
    return model.collate(obs, names)


@pytest.fixture(scope="module", params=[TINY, TINY_KP], ids=["tiny", "tiny-keypoints"])
def model(request):
    return build_model(NAMES, 0, request.param).eval()


def predict(backend_or_model, batch, k: int = 3, **kwargs) -> list[dict]:
    return backend_or_model.predict(batch, n_samples=k, generator=torch.Generator().manual_seed(7), **kwargs)


def max_diff(rows_a: list[dict], rows_b: list[dict], key: str) -> float:
    return max(
        (float(np.abs(a[key] - b[key]).max()) for a, b in zip(rows_a, rows_b, strict=True) if key in b), default=0.0
    )


def share_of_range(rows_a: list[dict], rows_b: list[dict]) -> float:
    """Max chunk difference over rows as a share of each embodiment's action range."""
    worst = 0.0
    for a, b in zip(rows_a, rows_b, strict=True):
        spec = EMBODIMENTS[b["embodiment"]]
        span = np.asarray(spec.action_high) - np.asarray(spec.action_low)
        worst = max(worst, float((np.abs(a["chunk"] - b["chunk"]) / span).max()))
    return worst


# ----- the staged forward every backend runs ---------------------------------------------------------------
def test_split_backbone_equals_backbone_forward(model) -> None:
    batch = mixed_batch(model)
    with torch.inference_mode():
        memory, pad_mask, pooled = model.encode(batch)
        proprio_tok = TorchBackend(model).proprio_tokens(batch)
        tokens = model.backbone.vision_tokens(batch.image, batch.instr_ids)
        split = model.backbone.transformer(tokens, batch.emb_idx, proprio_tok, batch.instr_ids)
    for got, want in zip(split, (memory, pad_mask, pooled), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fp32_backend_with_image_tokens_equals_the_model(model) -> None:
    batch = mixed_batch(model)
    backend = TorchBackend(model, "fp32")
    ref = predict(model, batch)
    rows = predict(backend, batch, image_tokens=backend.image_tokens(batch.image, batch.instr_ids))
    for key in ("chunk", "features", "entropy", "probs", "samples"):
        assert max_diff(rows, ref, key) == 0.0, key
    assert [set(r) for r in rows] == [set(r) for r in ref]
    assert [r["head_version"] for r in rows] == [r["head_version"] for r in ref]


# ----- precision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "feat_tol", "flow_tol"), [("bf16", 0.03, 0.02), ("int8", 0.06, 0.03)])
def test_reduced_precision_within_tolerance_of_fp32(model, precision: str, feat_tol: float, flow_tol: float) -> None:
    """Features within feat_tol of their scale; flow chunks within flow_tol of the action range; token-head
    logits (teacher-forced on the fp32 bins, so one flipped argmax cannot cascade) within tolerance too."""
    batch = mixed_batch(model)
    ref = predict(model, batch)
    backend = TorchBackend(model, precision)
    rows = predict(backend, batch)
    scale = max(float(np.abs(r["features"]).max()) for r in ref)
    assert max_diff(rows, ref, "features") <= feat_tol * scale
    flow = [i for i, r in enumerate(ref) if EMBODIMENTS[r["embodiment"]].head == "flow"]
    assert share_of_range([rows[i] for i in flow], [ref[i] for i in flow]) <= flow_tol
    # token heads: the converted head on the fp32 memory, same target bins
    with torch.inference_mode():
        memory, pad_mask, _ = model.encode(batch)
        for name in ("franka", "hello"):
            idx = batch.groups()[name]
            mem, pm = memory[idx], pad_mask[idx]
            head = model.head(name)
            bins = head.decode(mem, pm).bins
            want = head.teacher_forced_logits(mem, pm, bins)
            with precision_context(precision):
                got = backend.head(name).teacher_forced_logits(mem, pm, bins).float()
            assert float((got - want).abs().max()) <= feat_tol * float(want.abs().max()) + 1e-3


def test_convert_module_leaves_the_original_and_the_stems_alone(model) -> None:
    head = model.head("franka")
    before = {k: v.clone() for k, v in head.state_dict().items()}
    int8 = convert_module(head, "int8")
    bf16 = convert_module(head, "bf16")
    assert convert_module(head, "fp32") is head
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert type(int8.stem.proj) is torch.nn.Linear and int8.stem.proj.weight.dtype == torch.float32
    assert type(int8.out) is not torch.nn.Linear  # a dynamically quantized Linear
    assert bf16.out.weight.dtype == torch.bfloat16 and bf16.stem.proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        convert_module(head, "fp16")


# ----- ONNX Runtime ----------------------------------------------------------------------------------------
# exporting a token head traces its whole unrolled decode (seconds), so these use one token and one flow head
ONNX_NAMES = ("franka", "aloha")


@pytest.fixture(scope="module")
def small_model():
    return build_model(ONNX_NAMES, 0, TINY_KP).eval()


@pytest.fixture(scope="module")
def onnx_fp32(small_model):
    return OnnxBackend(small_model, "fp32", threads=1)


def small_batch(model, n: int, seed: int = 0):
    names = [ONNX_NAMES[i % 2] for i in range(n)]
    return model.collate([observation(name, seed + i) for i, name in enumerate(names)], names)


def test_onnx_fp32_matches_eager(small_model, onnx_fp32) -> None:
    """Tolerance 1e-4 absolute (float32 reassociation only); flow samples from the same generator."""
    for k, n in ((3, 6), (1, 1), (5, 3)):  # traced with 2 rows and K=2: other batch sizes and K must run
        batch = small_batch(small_model, n, seed=n)
        ref, rows = predict(small_model, batch, k), predict(onnx_fp32, batch, k)
        for key in ("chunk", "features", "entropy", "probs", "samples"):
            assert max_diff(rows, ref, key) <= 1e-4, (key, k, n)
        assert [set(r) for r in rows] == [set(r) for r in ref]


def test_onnx_serves_per_row_samples_and_prefixed_rows(small_model, onnx_fp32) -> None:
    """Rows with their own K (one session call) and rows with a committed prefix (the fp32 master head, the rule
    of every backend) match eager torch within 1e-4 when the generator draws in the same order."""
    from fleet.policy.batch import set_row_options

    batch = small_batch(small_model, 4, seed=9)  # franka, aloha, franka, aloha
    set_row_options(batch, small_model.specs, n_samples=[1, 2, 1, 5])
    ref, rows = predict(small_model, batch, 5), predict(onnx_fp32, batch, 5)
    for key in ("chunk", "samples", "entropy"):
        assert max_diff(rows, ref, key) <= 1e-4, key
    assert rows[3]["samples"].shape[0] == 5 and rows[1]["samples"].shape[0] == 2
    plan = np.full((6, 14), 0.01, np.float32)
    franka_plan = np.zeros((3, 7), np.float32)
    set_row_options(batch, small_model.specs, [2, 2, 2, 2], [(franka_plan, 2), (plan, 2), None, (plan, 1)])
    ref, rows = predict(small_model, batch, 2), predict(onnx_fp32, batch, 2)
    assert max_diff([rows[i] for i in (0, 1, 3)], [ref[i] for i in (0, 1, 3)], "chunk") <= 1e-4
    assert np.array_equal(rows[0]["chunk"][:2], ref[0]["chunk"][:2])  # forced bins: exact


def test_onnx_int8_within_tolerance(small_model) -> None:
    batch = small_batch(small_model, 6)
    ref, rows = predict(small_model, batch), predict(OnnxBackend(small_model, "int8", threads=1), batch)
    scale = max(float(np.abs(r["features"]).max()) for r in ref)
    assert max_diff(rows, ref, "features") <= 0.06 * scale
    flow = [i for i, r in enumerate(ref) if EMBODIMENTS[r["embodiment"]].head == "flow"]
    assert share_of_range([rows[i] for i in flow], [ref[i] for i in flow]) <= 0.03


def test_onnx_refuses_bf16_and_sampling_temperature(small_model, onnx_fp32) -> None:
    with pytest.raises(ValueError, match="bf16"):
        OnnxBackend(small_model, "bf16")
    batch = small_model.collate([observation("franka", 0)], ["franka"])
    with pytest.raises(ValueError, match="temperature"):
        onnx_fp32.predict(batch, temperature=1.0)


# ----- the runtime with each backend ---------------------------------------------------------------------
def request(name: str, i: int, robot: str | None = None, obs: dict | None = None) -> dict:
    k = 3 if EMBODIMENTS[name].head == "flow" else 1
    return make_request(robot or f"robot-{i}", name, obs or observation(name, i), obs_tick=i, n_samples=k)


@pytest.mark.parametrize(("backend", "precision", "tol"), [("onnx", "fp32", 1e-4), ("torch", "int8", 0.0)])
def test_runtime_backend_serves_and_hot_swaps_heads(backend: str, precision: str, tol: float) -> None:
    """A swapped head serves at the new version and computes what the donor's head computes (ONNX: against
    eager fp32 within its tolerance; int8: against the donor head quantized the same way, exactly)."""
    names = ONNX_NAMES
    runtime = PolicyRuntime(model=build_model(names, 0, TINY_KP), threads=1, backend=backend, precision=precision)
    reqs = [request(name, i) for i, name in enumerate(names * 3)]
    replies = runtime.act_batch(reqs)
    assert all("error" not in r for r in replies) and runtime.stats()["backend"] == f"{backend}-{precision}"
    donor = build_model(names, 1, TINY_KP).eval()
    runtime.set_head("aloha", 2, head_to_bytes(donor, "aloha", 2))
    assert runtime.head_versions() == {"franka": 1, "aloha": 2}
    seed = runtime._generator.initial_seed()
    runtime._generator.manual_seed(seed)
    after = runtime.act_batch(reqs)
    assert [r["head_version"] for r in after] == [2 if r["embodiment"] == "aloha" else 1 for r in after]
    reference = build_model(names, 0, TINY_KP)
    reference.load_head_state_dict("aloha", donor.head_state_dict("aloha"), 2)
    fresh = PolicyRuntime(model=reference, threads=1, backend="torch", precision="fp32" if tol else precision)
    fresh._generator.manual_seed(seed)
    for got, exp in zip(after, fresh.act_batch(reqs), strict=True):
        np.testing.assert_allclose(got["chunk"], exp["chunk"], atol=tol, rtol=0)
        assert got["head_version"] == exp["head_version"]
    with pytest.raises(ValueError, match="not newer"):
        runtime.set_head("aloha", 2, head_to_bytes(donor, "aloha", 2))


def test_serve_config_backend_fields() -> None:
    assert SERVE_BACKENDS == BACKENDS and SERVE_PRECISIONS == PRECISIONS
    cfg = ServeConfig.from_dict({"backend": "onnx", "precision": "int8", "encoder_cache": True})
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg
    for bad, field in (
        ({"backend": "tensorrt"}, "backend"),
        ({"precision": "fp16"}, "precision"),
        ({"backend": "onnx", "precision": "bf16"}, "precision"),
        ({"encoder_cache": "yes"}, "encoder_cache"),
        ({"encoder_cache_robots": 0}, "encoder_cache_robots"),
    ):
        with pytest.raises(ValueError, match=f"ServeConfig.{field}"):
            ServeConfig.from_dict(bad)
    with pytest.raises(ValueError, match="backend"):
        make_backend(build_model(NAMES[:1], 0, TINY), "tensorrt")


# ----- vision-encoder cache ------------------------------------------------------------------------------
def test_encoder_cache_hits_equal_misses(model) -> None:
    backend = TorchBackend(model)
    cache = EncoderCache(max_robots=8)
    batch = mixed_batch(model, 6)
    robots = [f"r{i}" for i in range(6)]
    images, instr = batch.image.numpy(), batch.instr_ids.numpy()
    first = cache.tokens(robots, images, instr, backend.image_tokens)
    assert cache.stats()["misses"] == 6 and cache.stats()["hits"] == 0
    again = cache.tokens(robots, images, instr, backend.image_tokens)
    assert cache.stats()["hits"] == 6
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(first, backend.image_tokens(images, instr))  # misses computed as one batch
    rows, ref = predict(backend, batch, image_tokens=again), predict(model, batch)
    for key in ("chunk", "features", "entropy", "samples"):
        assert max_diff(rows, ref, key) == 0.0
    # one changed pixel, or a changed instruction, is a miss; an empty robot id is never cached
    images2 = images.copy()
    images2[2, 10, 10, 0] ^= 1
    instr2 = instr.copy()
    instr2[4] = instr[0]  # row 0 has the other instruction
    robots2 = list(robots)
    robots2[5] = ""
    third = cache.tokens(robots2, images2, instr2, backend.image_tokens)
    assert cache.stats()["hits"] == 6 + 3
    np.testing.assert_array_equal(third[[0, 1, 3]], first[[0, 1, 3]])  # the hits are the stored tokens
    # the misses were encoded as a batch of 3, not 6: equal up to batch-size-dependent float rounding
    np.testing.assert_allclose(third, backend.image_tokens(images2, instr2), rtol=0, atol=1e-5)


def test_encoder_cache_is_bounded_lru() -> None:
    cache = EncoderCache(max_robots=2)
    img, ids = np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 8), np.int64)
    calls = []

    def compute(images, instr):
        calls.append(len(images))
        return np.ones((len(images), 3, 4), np.float32)

    for robot in ("a", "b", "a", "c", "a", "b"):  # b is evicted by c (a was used more recently)
        cache.tokens([robot], img, ids, compute)
    assert calls == [1, 1, 1, 1] and len(cache) == 2
    with pytest.raises(ValueError, match="max_robots"):
        EncoderCache(0)


def test_runtime_encoder_cache_replies_equal_uncached(model) -> None:
    plain = PolicyRuntime(model=model, threads=1)
    cached = PolicyRuntime(model=model, threads=1, encoder_cache=True)
    obs = {name: observation(name, i) for i, name in enumerate(NAMES)}
    for tick in range(3):  # a static scene: every robot sends the same frame again
        reqs = [request(name, tick, robot=f"bot-{name}", obs=obs[name]) for name in NAMES]
        for got, want in zip(cached.act_batch(reqs), plain.act_batch(reqs), strict=True):
            np.testing.assert_array_equal(got["chunk"], want["chunk"])
            np.testing.assert_array_equal(got["features"], want["features"])
    assert cached.stats()["encoder_cache"]["hits"] == 2 * len(NAMES)


# ----- LoRA ----------------------------------------------------------------------------------------------
def test_lora_merged_equals_unmerged_and_restores_the_head(model) -> None:
    work = copy.deepcopy(model)
    batch = mixed_batch(work)
    names = list(work.head("aloha").state_dict())
    before_trainable = {n for n, p in work.head("aloha").named_parameters() if p.requires_grad}
    for name in ("franka", "aloha"):
        params = add_lora(work.head(name), rank=4, alpha=8.0)
        assert params and all(p.requires_grad for p in params)
        trainable = [p for p in work.head(name).parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for p in params}  # only the adapters train
        with torch.no_grad():
            for p in params:  # a trained-looking adapter (B starts at zero, which would prove nothing)
                p.normal_(std=0.2)
    assert has_lora(work.head("franka"))
    with pytest.raises(ValueError, match="already"):
        add_lora(work.head("franka"))
    unmerged = predict(work, batch)
    saved = lora_state_dict(work.head("aloha"))
    assert merge_lora(work.head("franka")) > 0 and merge_lora(work.head("aloha")) > 0
    merged = predict(work, batch)
    for key in ("chunk", "entropy", "samples"):
        assert max_diff(merged, unmerged, key) <= 1e-5, key
    assert not has_lora(work.head("aloha")) and list(work.head("aloha").state_dict()) == names
    assert {n for n, p in work.head("aloha").named_parameters() if p.requires_grad} == before_trainable
    head_to_bytes(work, "aloha")  # a merged head ships like any other
    # adapters travel alone and reload
    add_lora(work.head("aloha"), rank=4, alpha=8.0)
    load_lora_state_dict(work.head("aloha"), saved)
    for key, value in lora_state_dict(work.head("aloha")).items():
        torch.testing.assert_close(value, saved[key])
    assert remove_lora(work.head("aloha")) > 0 and not has_lora(work.head("aloha"))


def test_lora_training_step_moves_only_the_adapters(model) -> None:
    work = copy.deepcopy(model).train()
    head = work.head("hello")
    frozen = {k: v.clone() for k, v in head.state_dict().items()}
    params = add_lora(head, rank=2, alpha=4.0)
    opt = torch.optim.SGD(params, lr=0.1)
    names = ["hello"] * 4
    batch = work.collate(
        [observation("hello", i) for i in range(4)],
        names,
        [np.zeros((16, EMBODIMENTS["hello"].action_dim), np.float32)] * 4,
    )
    for _ in range(2):
        loss, _ = work.action_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(float(p.detach().abs().sum()) > 0 for p in params[1::2])  # some B moved off zero
    merge_lora(head)
    changed = [k for k, v in head.state_dict().items() if not torch.equal(v, frozen[k])]
    assert changed and all(k.endswith("weight") for k in changed)  # only adapted weights changed, by the merge
