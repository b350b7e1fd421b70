"""FleetPolicy on a tiny config: shapes, cached decoding, flow sampling, overfitting, head-only training, collate."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from fleet.embodiments import EMBODIMENTS, EmbodimentSpec
from fleet.policy.backbone import PolicyConfig
from fleet.policy.batch import collate
from fleet.policy.model import FleetPolicy
from fleet.policy.tokenizer import default_vocabulary
from fleet.sim import make_env
from tests.mocks.tiny_policy import TINY as SHARED_TINY

torch.set_num_threads(1)

# the shared tiny configuration with a deeper head and more flow steps: enough capacity to overfit a batch
TINY = dataclasses.replace(SHARED_TINY, head_layers=2, n_euler=4, flow_train_noise=16)
INSTRUCTIONS = {
    "franka": "pick up the red cube",
    "aloha": "lift the blue bar with both arms",
    "hello": "drive to the green marker",
    "leap": "grasp the pen",
}


def tiny_model(seed: int = 0, specs: dict[str, EmbodimentSpec] | None = None) -> FleetPolicy:
    torch.manual_seed(seed)
    return FleetPolicy(TINY, dict(EMBODIMENTS) if specs is None else specs, default_vocabulary())


def fake_obs(name: str, rng: np.random.Generator) -> dict:
    spec = EMBODIMENTS[name]
    return {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(spec.proprio_dim).astype(np.float32),
        "instruction": INSTRUCTIONS[name],
    }


def fake_actions(name: str, rng: np.random.Generator) -> np.ndarray:
    spec = EMBODIMENTS[name]
    return rng.uniform(spec.action_low, spec.action_high, (spec.chunk_size, spec.action_dim)).astype(np.float32)


def mixed_batch(model: FleetPolicy, names: list[str], seed: int = 0, with_actions: bool = False):
    rng = np.random.default_rng(seed)
    obs = [fake_obs(n, rng) for n in names]
    acts = [fake_actions(n, rng) for n in names] if with_actions else None
    return model.collate(obs, names, acts)


MIXED = ["franka", "aloha", "hello", "leap", "leap", "franka", "aloha", "hello"]


def test_predict_shapes_for_every_head_in_a_mixed_batch() -> None:
    model = tiny_model()
    rows = model.predict(mixed_batch(model, MIXED), n_samples=3, generator=torch.Generator().manual_seed(0))
    assert len(rows) == len(MIXED)
    for name, row in zip(MIXED, rows, strict=True):
        spec = EMBODIMENTS[name]
        assert row["embodiment"] == name and row["head_version"] == 1
        assert row["chunk"].shape == (16, spec.action_dim) and row["chunk"].dtype == np.float32
        assert (row["chunk"] >= np.float32(spec.action_low) - 1e-6).all()
        assert (row["chunk"] <= np.float32(spec.action_high) + 1e-6).all()
        assert row["features"].shape == (TINY.d_model,)
        if spec.head == "flow":
            assert row["samples"].shape == (3, 16, spec.action_dim) and "entropy" not in row
        else:
            assert row["entropy"].shape == (16, spec.action_dim) and "samples" not in row
            assert (row["entropy"] >= 0).all() and (row["entropy"] <= math.log(TINY.n_bins) + 1e-5).all()
            assert ((row["probs"] > 0) & (row["probs"] <= 1)).all()
    single = model.predict(mixed_batch(model, ["aloha"]), n_samples=1)
    assert "samples" not in single[0]


def test_backbone_runs_once_and_each_head_once_per_mixed_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    calls: list[str] = []
    model.backbone.register_forward_hook(lambda *_: calls.append("backbone"))
    for name, head in model.heads.items():
        original = head.predict
        monkeypatch.setattr(head, "predict", lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model.predict(mixed_batch(model, MIXED), n_samples=2)
    assert sorted(calls) == sorted(["backbone", "franka", "aloha", "hello", "leap"])


def test_kv_cached_decoding_equals_uncached() -> None:
    model = tiny_model()
    batch = mixed_batch(model, ["franka", "franka", "franka"])
    head = model.heads["franka"]
    with torch.no_grad():
        memory, pad_mask, _ = model.encode(batch)
        cached = head.decode(memory, pad_mask, use_cache=True)
        uncached = head.decode(memory, pad_mask, use_cache=False)
        assert torch.equal(cached.bins, uncached.bins)
        torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-5, rtol=1e-5)
        # teacher forcing on the decoded bins is the same computation in one causal pass
        tf = head.teacher_forced_logits(memory, pad_mask, cached.bins)
        torch.testing.assert_close(tf, cached.logits, atol=1e-5, rtol=1e-5)
        # sampling: same generator seed -> same bins, cached or not
        s1 = head.decode(memory, pad_mask, 1.0, torch.Generator().manual_seed(3), use_cache=True)
        s2 = head.decode(memory, pad_mask, 1.0, torch.Generator().manual_seed(3), use_cache=False)
        assert torch.equal(s1.bins, s2.bins)


def test_flow_samples_differ_across_noise_and_repeat_with_the_seed() -> None:
    model = tiny_model()
    batch = mixed_batch(model, ["leap", "aloha"])
    a = model.predict(batch, n_samples=4, generator=torch.Generator().manual_seed(7))
    b = model.predict(batch, n_samples=4, generator=torch.Generator().manual_seed(7))
    c = model.predict(batch, n_samples=4, generator=torch.Generator().manual_seed(8))
    for ra, rb, rc in zip(a, b, c, strict=True):
        assert np.array_equal(ra["samples"], rb["samples"]) and np.array_equal(ra["chunk"], rb["chunk"])
        assert not np.allclose(ra["samples"], rc["samples"])
        spread = ra["samples"].std(axis=0)
        assert (spread > 1e-4).mean() > 0.9  # the K samples differ from each other
        mean = np.clip(ra["samples"].mean(axis=0), -1, 1)
        np.testing.assert_allclose(model.normalize_actions(ra["embodiment"], ra["chunk"]), mean, atol=1e-5)


def test_flow_execute_sample_executes_the_first_sample_for_the_named_embodiments_only() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, flow_execute_sample=("leap",))
    model = FleetPolicy(cfg, dict(EMBODIMENTS), default_vocabulary())
    batch = mixed_batch(model, ["leap", "aloha"])
    leap, aloha = model.predict(batch, n_samples=4, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(
        model.normalize_actions("leap", leap["chunk"]), np.clip(leap["samples"][0], -1, 1), atol=1e-5
    )
    assert not np.allclose(leap["samples"][0], leap["samples"].mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(
        model.normalize_actions("aloha", aloha["chunk"]), np.clip(aloha["samples"].mean(axis=0), -1, 1), atol=1e-5
    )
    assert PolicyConfig.from_dict({**TINY.to_dict(), "flow_execute_sample": ["leap"]}).flow_execute_sample == ("leap",)
    with pytest.raises(ValueError, match="flow_execute_sample"):
        dataclasses.replace(TINY, flow_execute_sample="leap")


@pytest.mark.parametrize(("name", "steps", "lr"), [("franka", 300, 3e-3), ("aloha", 400, 1e-2)])
def test_tiny_batch_can_be_overfitted(name: str, steps: int, lr: float) -> None:
    model = tiny_model(seed=1)
    batch = mixed_batch(model, [name] * 4, seed=1, with_actions=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)

    def eval_loss() -> float:  # fixed noise draws, averaged, so flow losses compare fairly
        with torch.no_grad():
            return float(
                np.mean([model.action_loss(batch, torch.Generator().manual_seed(100 + k))[0] for k in range(4)])
            )

    before = eval_loss()
    for _ in range(steps):
        loss, metrics = model.action_loss(batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert set(metrics) == {name} and metrics[name]["rows"] == 4
    assert after < 0.1 * before, (before, after)


def test_head_only_training_leaves_backbone_and_other_heads_bit_identical() -> None:
    model = tiny_model()
    backbone0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    franka0 = model.head_state_dict("franka")
    hello0 = model.head_state_dict("hello")
    model.freeze_backbone()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    opt = torch.optim.AdamW(model.trainable_head_parameters("hello"), lr=1e-2, weight_decay=0.1)
    batch = mixed_batch(model, ["hello", "franka", "hello"], with_actions=True)
    for _ in range(5):
        loss, _ = model.action_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone0[k]), k
    for k, v in model.head_state_dict("franka").items():
        assert torch.equal(v, franka0[k]), k
    changed = model.head_state_dict("hello")
    assert not torch.equal(changed["stem.proj.weight"], hello0["stem.proj.weight"])  # the stem is the head's
    assert not torch.equal(changed["out.weight"], hello0["out.weight"])


def test_head_state_dict_round_trip_and_refusals() -> None:
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    b.load_head_state_dict("leap", a.head_state_dict("leap"), version=3)
    assert b.head_versions["leap"] == 3
    for k, v in a.head_state_dict("leap").items():
        assert torch.equal(v, b.head_state_dict("leap")[k])
    state = a.head_state_dict("leap")
    state["out.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"out\.weight.*\(5, 5\)"):
        b.load_head_state_dict("leap", state, version=4)
    with pytest.raises(ValueError, match="missing"):
        b.load_head_state_dict("aloha", a.head_state_dict("franka"), version=4)


def test_instruction_padding_is_masked() -> None:
    model = tiny_model()
    batch = mixed_batch(model, ["franka", "leap"])
    before = model.predict(batch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.backbone.word_embed.weight[0].normal_()  # [PAD] must not matter
    after = model.predict(batch, generator=torch.Generator().manual_seed(0))
    for r0, r1 in zip(before, after, strict=True):
        np.testing.assert_allclose(r0["features"], r1["features"], atol=1e-5)


def test_normalization_round_trip() -> None:
    model = tiny_model()
    rng = np.random.default_rng(0)
    for name in EMBODIMENTS:
        a = fake_actions(name, rng)
        n = model.normalize_actions(name, a)
        assert n.min() >= -1 and n.max() <= 1
        np.testing.assert_allclose(model.denormalize_actions(name, n), a, atol=1e-5)


def _bad(field: str, value: object) -> dict:
    obs = fake_obs("franka", np.random.default_rng(0))
    obs[field] = value
    return obs


@pytest.mark.parametrize(
    ("obs", "name", "pattern"),
    [
        (_bad("image", np.zeros((64, 64), np.uint8)), "franka", r"observation 1 \(franka\).*'image'.*\(64, 64, 3\)"),
        (_bad("image", np.zeros((64, 64, 3), np.float32)), "franka", r"'image'.*uint8"),
        (_bad("proprio", np.zeros(5, np.float32)), "franka", r"observation 1.*'proprio'.*\(8,\)"),
        (_bad("proprio", np.full(8, np.nan, np.float32)), "franka", r"'proprio'.*finite"),
        (_bad("instruction", 3), "franka", r"'instruction'.*str"),
        ({"image": np.zeros((64, 64, 3), np.uint8)}, "franka", r"missing field 'proprio'"),
        (_bad("image", np.zeros((64, 64, 3), np.uint8)), "spot", r"observation 1: unknown embodiment 'spot'"),
    ],
)
def test_collate_rejects_bad_observations(obs: dict, name: str, pattern: str) -> None:
    good = fake_obs("hello", np.random.default_rng(1))
    vocab = default_vocabulary()
    with pytest.raises(ValueError, match=pattern):
        collate([good, obs], ["hello", name], vocab, EMBODIMENTS)


def test_collate_rejects_bad_actions_and_pads_fields() -> None:
    vocab = default_vocabulary()
    rng = np.random.default_rng(0)
    obs = [fake_obs("hello", rng), fake_obs("leap", rng)]
    with pytest.raises(ValueError, match=r"observation 1 \(leap\).*'actions'.*\(16, 24\)"):
        collate(obs, ["hello", "leap"], vocab, EMBODIMENTS, [fake_actions("hello", rng), np.zeros((16, 3))])
    batch = collate(obs, ["hello", "leap"], vocab, EMBODIMENTS, [fake_actions("hello", rng), fake_actions("leap", rng)])
    assert batch.image.shape == (2, 64, 64, 3) and batch.image.dtype == torch.uint8
    assert batch.proprio.shape == (2, 24) and (batch.proprio[0, 5:] == 0).all()
    assert batch.actions.shape == (2, 16, 24) and (batch.actions[0, :, 3:] == 0).all()
    assert batch.emb_idx.tolist() == [vocab.token_id("[EMB_HELLO]"), vocab.token_id("[EMB_LEAP]")]


def test_focus_loss_trains_the_query_keypoint_onto_the_named_object() -> None:
    """The auxiliary focus loss moves the first query keypoint to the privileged object position (and only
    applies when the batch carries focus labels)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, keypoints=2, aux_focus_weight=5.0)
    model = FleetPolicy(cfg, {"franka": EMBODIMENTS["franka"]}, default_vocabulary())
    env = make_env("franka")
    obs, focus, acts = [], [], []
    for seed in range(8):
        o, _ = env.reset(seed=seed)
        obs.append(o)
        focus.append(env.unwrapped.focus())
        acts.append(env.unwrapped.expert_chunk(16))
    batch = model.collate(obs, ["franka"] * 8, acts)
    plain, metrics = model.action_loss(batch)
    assert "focus_err" not in metrics["franka"]
    batch.focus = torch.from_numpy(np.stack(focus))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    errs = []
    for _ in range(60):
        loss, metrics = model.action_loss(batch)
        errs.append(metrics["franka"]["focus_err"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert errs[-1] < 0.5 * errs[0]
