"""Real-time chunking in the heads, and per-row flow samples: prefix-free rows bit-identical to the plain path,
guided chunks that follow the prefix, token prefix forcing exact, every backend serving prefixed rows."""

import dataclasses

import numpy as np
import pytest
import torch

from fleet.embodiments import EMBODIMENTS
from fleet.policy.batch import denormalize_actions, normalize_actions, set_row_options
from fleet.policy.model import FleetPolicy
from fleet.policy.rtc import GroupPrefix, guidance_weight, prefix_weights
from fleet.policy.tokenizer import default_vocabulary
from fleet.protocol import RequestError, make_request, validate_request
from tests.mocks.tiny_policy import TINY

torch.set_num_threads(1)

CFG = dataclasses.replace(TINY, n_euler=6)
NAMES = ["aloha", "franka", "aloha", "leap", "hello", "aloha"]
INSTRUCTIONS = {
    "franka": "pick up the red cube",
    "aloha": "lift the blue bar with both arms",
    "hello": "drive to the green marker",
    "leap": "grasp the pen",
}


@pytest.fixture(scope="module")
def model() -> FleetPolicy:
    torch.manual_seed(0)
    return FleetPolicy(CFG, dict(EMBODIMENTS), default_vocabulary()).eval()


def observations(names: list[str], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "proprio": rng.standard_normal(EMBODIMENTS[n].proprio_dim).astype(np.float32),
            "instruction": INSTRUCTIONS[n],
        }
        for n in names
    ]


def plan(name: str, n: int, seed: int = 0) -> np.ndarray:
    """A smooth plan (n, D) in physical units, inside the action range."""
    spec = EMBODIMENTS[name]
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    t = np.linspace(0, 1, n)[:, None]
    phase = np.random.default_rng(seed).uniform(0, 6, spec.action_dim)[None]
    return (low + (high - low) * (0.5 + 0.3 * np.sin(2 * t + phase))).astype(np.float32)


def predict(model, names, k=4, seed=1, n_samples=None, prefixes=None):
    batch = model.collate(observations(names), names)
    set_row_options(batch, model.specs, n_samples, prefixes)
    return model.predict(batch, n_samples=k, generator=torch.Generator().manual_seed(seed))


def reference_flow_sample(head, memory, pad_mask, k, generator):
    """The flow sampler as it was before per-row options (the Euler loop written out)."""
    kvs, mask, direct = head.memory_context(memory, pad_mask, repeat=k)
    x = torch.randn((memory.shape[0] * k, head.chunk_size, head.action_dim), generator=generator)
    dt = 1.0 / head.config.n_euler
    for i in range(head.config.n_euler):
        x = x + dt * head.velocity(x, torch.full((x.shape[0],), i * dt), kvs, mask, direct)
    return x.view(memory.shape[0], k, head.chunk_size, head.action_dim)


def test_prefix_free_flow_rows_are_bit_identical_to_the_plain_sampler(model) -> None:
    batch = model.collate(observations(["aloha"] * 3), ["aloha"] * 3)
    head = model.head("aloha")
    with torch.inference_mode():
        memory, pad_mask, _ = model.encode(batch)
        ref = reference_flow_sample(head, memory, pad_mask, 4, torch.Generator().manual_seed(3))
        out = head.predict(memory, pad_mask, 4, 0.0, torch.Generator().manual_seed(3))
        # the per-row path with every row at the same K and no prefix draws and integrates the same
        rows = head.predict(memory, pad_mask, 4, 0.0, torch.Generator().manual_seed(3), row_samples=[4, 4, 4])
    assert torch.equal(out["samples"], ref)
    assert torch.equal(out["chunk"], ref.mean(1).clamp(-1, 1))
    assert torch.equal(rows["samples"], ref)


def test_rows_without_prefix_in_a_mixed_batch_match_a_batch_without_prefixes(model) -> None:
    plain = predict(model, NAMES)
    again = predict(model, NAMES, prefixes=[None] * len(NAMES))  # all None: the plain path
    mixed = predict(model, NAMES, prefixes=[(plan("aloha", 12), 3), None, None, (plan("leap", 8), 2), None, None])
    for a, b in zip(plain, again, strict=True):
        assert np.array_equal(a["chunk"], b["chunk"])
    for i in (1, 2, 4, 5):  # no prefix: bit for bit the chunks and samples of the prefix-free batch
        assert np.array_equal(mixed[i]["chunk"], plain[i]["chunk"]), NAMES[i]
        if "samples" in plain[i]:
            assert np.array_equal(mixed[i]["samples"], plain[i]["samples"])
    assert not np.allclose(mixed[0]["chunk"], plain[0]["chunk"])


def test_guided_flow_chunk_follows_the_prefix(model) -> None:
    """The guided chunk's committed steps come out within 0.1 of the action range of the prefix (the
    untrained tiny net's own chunks are ~0.3 away) and the guidance leaves the steps past the prefix free."""
    names = ["aloha"] * 4
    spec = EMBODIMENTS["aloha"]
    span = np.asarray(spec.action_high) - np.asarray(spec.action_low)
    prefixes = [(plan("aloha", 10, seed=s), 4) for s in range(4)]
    plain = predict(model, names)
    guided = predict(model, names, prefixes=prefixes)
    for (p, d), g, u in zip(prefixes, guided, plain, strict=True):
        err = np.abs(g["chunk"][:d] - p[:d]) / span
        free = np.abs(u["chunk"][:d] - p[:d]) / span
        assert err.mean() < 0.1 and err.mean() < 0.5 * free.mean(), (err.mean(), free.mean())
        assert g["samples"].shape == (4, spec.chunk_size, spec.action_dim)


def test_prefix_weights_and_guidance_weight() -> None:
    w = prefix_weights(torch.tensor([10, 4, 0]), torch.tensor([3, 4, 0]), 16)
    assert torch.equal(w[0, :3], torch.ones(3)) and torch.all(w[0, 10:] == 0)
    assert torch.all(w[0, 3:10] < 1) and torch.all(w[0, 3:10] > 0) and torch.all(w[0, 3:9] >= w[0, 4:10])
    assert torch.equal(w[1, :4], torch.ones(4)) and torch.all(w[1, 4:] == 0)
    assert torch.all(w[2] == 0)
    assert guidance_weight(0.0) == 5.0 and guidance_weight(0.5) == 2.0 and guidance_weight(0.9, beta=50) < 50


def test_token_prefix_forcing_reproduces_the_prefix_exactly(model) -> None:
    names = ["franka", "hello", "franka"]
    prefixes = [(plan("franka", 6), 5), (plan("hello", 3), 3), None]
    rows = predict(model, names, prefixes=prefixes)
    plain = predict(model, names)
    n_bins = model.config.n_bins
    for (p, d), row, name in zip(prefixes[:2], rows[:2], names[:2], strict=True):
        spec = model.specs[name]
        bins = np.clip(np.floor((normalize_actions(spec, p[:d]) + 1) * n_bins / 2), 0, n_bins - 1)
        quantized = denormalize_actions(spec, -1 + (bins + 0.5) * 2 / n_bins)  # the tokenizer's bin centres
        assert np.array_equal(row["chunk"][:d], quantized)
        assert row["entropy"].shape == (spec.chunk_size, spec.action_dim)
    assert np.array_equal(rows[2]["chunk"], plain[2]["chunk"]) and np.array_equal(
        rows[2]["entropy"], plain[2]["entropy"]
    )


def test_each_row_draws_its_own_number_of_flow_samples(model) -> None:
    """#17: one request asking for 32 samples made every flow row of its batch draw 32 (and average them)."""
    from fleet.serving.runtime import PolicyRuntime

    runtime = PolicyRuntime(model=model, threads=1)
    obs = observations(["aloha", "aloha", "leap"])
    reqs = [
        make_request(f"r{i}", n, o, n_samples=k)
        for i, (n, o, k) in enumerate(zip(["aloha", "aloha", "leap"], obs, [32, 2, 3], strict=True))
    ]
    replies = runtime.act_batch(reqs)
    assert [r["samples"].shape[0] for r in replies] == [32, 2, 3]
    spec = model.specs["aloha"]
    for r in replies[:2]:  # an aloha chunk is the mean of its own samples, not of the 32 of its neighbour
        own = denormalize_actions(spec, np.clip(r["samples"].mean(0), -1, 1))
        np.testing.assert_allclose(r["chunk"], own, atol=1e-5)
    assert np.isfinite(replies[1]["samples"]).all()
    alone = runtime.act_batch([reqs[1] | {"n_samples": 1}])[0]
    assert "samples" not in alone


def test_runtime_serves_prefix_requests_and_rejects_bad_ones(model) -> None:
    from fleet.serving.runtime import PolicyRuntime

    runtime = PolicyRuntime(model=model, threads=1)
    o = observations(["franka", "aloha"])
    good = make_request("r0", "franka", o[0], prefix=plan("franka", 4), prefix_delay=2)
    bad = make_request("r1", "aloha", o[1], n_samples=2) | {"prefix": np.zeros((3, 5), np.float32)}
    replies = runtime.act_batch([good, bad])
    assert "error" not in replies[0] and replies[0]["chunk"].shape == (16, 7)
    assert replies[1]["error"].startswith("prefix:") and "(n, 14)" in replies[1]["error"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"prefix": np.zeros((17, 14), np.float32)}, "prefix"),
        ({"prefix": np.full((2, 14), np.nan, np.float32)}, "prefix"),
        ({"prefix": "abc"}, "prefix"),
        ({"prefix": np.zeros((4, 14), np.float32), "prefix_delay": 5}, "prefix_delay"),
        ({"prefix": np.zeros((4, 14), np.float32), "prefix_delay": True}, "prefix_delay"),
        ({"prefix_delay": 2}, "prefix_delay"),
    ],
)
def test_request_prefix_validation(change: dict, field: str) -> None:
    req = make_request("r", "aloha", observations(["aloha"])[0]) | change
    with pytest.raises(RequestError, match=f"^{field}:"):
        validate_request(req)


def test_request_prefix_round_trips_and_defaults_its_delay() -> None:
    from fleet.protocol import request_to_wire

    p = plan("leap", 5)
    req = validate_request(request_to_wire(make_request("r", "leap", observations(["leap"])[0], prefix=p)))
    assert np.array_equal(req["prefix"], p) and req["prefix_delay"] == 5
    assert validate_request(make_request("r", "leap", observations(["leap"])[0]))["prefix"] is None


def test_backends_serve_prefixed_rows_on_the_master_head(model) -> None:
    """The rule: rows with a prefix run the fp32 master head whatever the backend; the others its own head."""
    from fleet.policy.inference.backend import TorchBackend

    names = ["aloha", "franka", "aloha"]
    prefixes = [(plan("aloha", 8), 2), (plan("franka", 3), 3), None]
    ref = predict(model, names, prefixes=prefixes, n_samples=[3, 1, 2])
    batch = set_row_options(model.collate(observations(names), names), model.specs, [3, 1, 2], prefixes)
    int8 = TorchBackend(model, "int8").predict(batch, n_samples=3, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(int8[1]["chunk"][:3], ref[1]["chunk"][:3])  # forced on the master: exact
    assert [r.get("samples", np.zeros((1,))).shape[0] for r in int8] == [3, 1, 2]
    span = np.asarray(EMBODIMENTS["aloha"].action_high) - np.asarray(EMBODIMENTS["aloha"].action_low)
    assert np.abs(int8[0]["chunk"][:2] - prefixes[0][0][:2]).max() / span.max() < 0.5


def test_group_prefix_select() -> None:
    gp = GroupPrefix(torch.zeros(3, 16, 2), torch.tensor([0, 4, 2]), torch.tensor([0, 1, 2]))
    assert gp.rows.tolist() == [False, True, True] and gp.any()
    assert gp.select(torch.tensor([2])).length.tolist() == [2]
