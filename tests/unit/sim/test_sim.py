"""The simulated robots: gymnasium conformance, the expert, determinism, the distribution shifts, bad actions."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from fleet.embodiments import get_embodiment
from fleet.sim import INSTRUCTION_WORDS, SHIFTS, env_names, make_env, parse_shift, render
from fleet.sim.base import INSTRUCTION_CHARSET
from fleet.sim.leap import NOVEL_OBJECTS, OBJECTS, TRAIN_OBJECTS
from tests.mocks.sim_helpers import (
    NAMES,
    assert_tree_equal,
    assert_unchanged,
    expert_episode,
    expert_success,
    mid_action,
    snapshot,
)

ALL_SHIFTS = "+".join(SHIFTS)
SHIFT_CASES = [*SHIFTS, ALL_SHIFTS]
SHIFT_IDS = [*SHIFTS, "all"]
REQUIRED_SUCCESS = 0.98


def _random_actions(env, n: int, seed: int) -> list[np.ndarray]:
    u = env.unwrapped
    rng = np.random.default_rng(seed)
    return [(u._low + (u._high - u._low) * rng.random(u._low.shape)).astype(np.float32) for _ in range(n)]


def _expert_steps(env, k: int) -> None:
    for _ in range(k):
        env.step(env.unwrapped.expert_action())


def _pair(name: str, shift, seed: int):
    """The same episode without and with `shift`, both reset."""
    plain, shifted = make_env(name), make_env(name, shift=shift)
    return plain, plain.reset(seed=seed)[0], shifted, shifted.reset(seed=seed)[0]


# ---- gymnasium conformance ---------------------------------------------------------------------------
def test_env_names_are_the_builtins():
    assert set(NAMES) <= set(env_names())


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized space")
@pytest.mark.parametrize("shift", [None, ALL_SHIFTS], ids=["plain", "all_shifts"])
@pytest.mark.parametrize("name", NAMES)
def test_check_env(name, shift):
    check_env(make_env(name, seed=0, shift=shift).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("name", NAMES)
def test_spaces_match_spec(name):
    env = make_env(name)
    spec = get_embodiment(name)
    assert env.unwrapped.embodiment_spec is spec
    assert isinstance(env.action_space, spaces.Box)
    assert env.action_space.shape == (spec.action_dim,) and env.action_space.dtype == np.float32
    np.testing.assert_allclose(env.action_space.low, spec.action_low, rtol=1e-6)
    np.testing.assert_allclose(env.action_space.high, spec.action_high, rtol=1e-6)
    obs_space = env.observation_space
    assert isinstance(obs_space, spaces.Dict) and set(obs_space.spaces) == {"image", "proprio", "instruction"}
    assert obs_space["image"].shape == (64, 64, 3) and obs_space["image"].dtype == np.uint8
    assert obs_space["proprio"].shape == (spec.proprio_dim,) and obs_space["proprio"].dtype == np.float32
    assert isinstance(obs_space["instruction"], spaces.Text)


@pytest.mark.parametrize("name", NAMES)
def test_calls_before_reset_raise(name):
    u = make_env(name).unwrapped
    for call in (lambda: u.step(mid_action(u)), u.expert_action, u.expert_chunk, u.render):
        with pytest.raises(RuntimeError, match="before reset"):
            call()


def _check_obs(env, obs) -> None:
    spec = env.unwrapped.embodiment_spec
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (64, 64, 3)
    assert obs["proprio"].dtype == np.float32 and obs["proprio"].shape == (spec.proprio_dim,)
    assert isinstance(obs["instruction"], str) and obs["instruction"]
    assert env.observation_space.contains(obs), {
        k: v for k, v in obs.items() if not env.observation_space[k].contains(v)
    }


@pytest.mark.parametrize("shift", [None, ALL_SHIFTS], ids=["plain", "all_shifts"])
@pytest.mark.parametrize("name", NAMES)
def test_rollout_invariants(name, shift):
    """Every observation is in the space; info has is_success every step; episodes end by success or time limit."""
    env = make_env(name, shift=shift)
    u = env.unwrapped
    limit = u.embodiment_spec.max_episode_steps
    for seed in range(4):
        for policy in ("expert", "random"):
            obs, info = env.reset(seed=seed)
            _check_obs(env, obs)
            assert info["is_success"] is False and info["t"] == 0
            actions = iter(_random_actions(env, limit, seed))
            t, done = 0, False
            while not done:
                a = u.expert_action() if policy == "expert" else next(actions)
                obs, reward, term, trunc, info = env.step(a)
                t += 1
                _check_obs(env, obs)
                assert np.array_equal(env.render(), obs["image"])
                assert isinstance(info["is_success"], bool), info
                assert info["t"] == t == u.t
                assert np.isfinite(info["force"]) and info["force"] >= 0.0
                ex = info["executed_action"]
                assert ex.shape == (u.embodiment_spec.action_dim,) and env.action_space.contains(ex)
                assert term == info["is_success"] and reward == float(info["is_success"])
                assert trunc == (t >= limit and not term)
                assert not (term and trunc)
                done = term or trunc
            assert t <= limit
            if policy == "expert":
                assert term, f"{name} expert did not finish seed {seed} within {limit} steps"


@pytest.mark.parametrize("name", NAMES)
def test_time_limit_truncates(name):
    """A robot that does nothing useful is truncated exactly at spec.max_episode_steps, never terminated."""
    env = make_env(name)
    limit = env.unwrapped.embodiment_spec.max_episode_steps
    hold = np.clip(np.zeros_like(mid_action(env)), env.unwrapped._low, env.unwrapped._high)
    for seed in range(5):
        env.reset(seed=seed)
        for t in range(1, limit + 1):
            _, reward, term, trunc, info = env.step(hold)
            assert info["is_success"] is False and not term and reward == 0.0, f"seed {seed} t={t}"
            assert trunc == (t == limit), f"truncated={trunc} at t={t}, limit {limit}"


@pytest.mark.parametrize("name", NAMES)
def test_random_policy_rarely_succeeds(name):
    """The tasks are not trivially solved: uniformly random actions almost never succeed."""
    env = make_env(name)
    limit = env.unwrapped.embodiment_spec.max_episode_steps
    wins = 0
    for seed in range(20):
        env.reset(seed=seed)
        for a in _random_actions(env, limit, seed=seed):
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                wins += term
                break
    assert wins <= 2, f"{name}: a random policy succeeded in {wins}/20 episodes"


def _task_done(name: str, u) -> bool:
    """The embodiment's task, checked on the privileged state independently of the env's own success flag."""
    s = u._state
    if name == "franka":
        return s["holding"] == s["target"] and s["ee"][2] > 0.12
    if name == "aloha":
        return all(arm["holding"] and arm["ee"][2] > 0.12 for arm in s["arms"])
    if name == "hello":
        return float(np.hypot(*(s["pos"] - s["markers"][s["target"]]))) < 0.3
    return float(np.abs(s["q"] - s["goal"]).max()) < 0.1


@pytest.mark.parametrize("name", NAMES)
def test_success_means_the_task_is_done(name):
    env = make_env(name)
    u = env.unwrapped
    for seed in range(5):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, term, trunc, info = env.step(u.expert_action())
            assert info["is_success"] == _task_done(name, u), f"seed {seed} t={u.t}"
            done = term or trunc


@pytest.mark.parametrize("name", NAMES)
def test_expert_episode_terminates_on_success(name):
    env = make_env(name, seed=11)
    env.reset()
    history = []
    done = False
    while not done:
        _, reward, term, trunc, info = env.step(env.unwrapped.expert_action())
        history.append((reward, term, trunc, info["is_success"]))
        done = term or trunc
    assert history[-1] == (1.0, True, False, True)
    assert all(h == (0.0, False, False, False) for h in history[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_instructions_use_the_vocabulary(name):
    vocab = set(INSTRUCTION_WORDS)
    for shift in (None, "novel_object"):
        env = make_env(name, shift=shift)
        for seed in range(40):
            text = env.reset(seed=seed)[0]["instruction"]
            assert set(text.split()) <= vocab, text
            assert set(text) <= set(INSTRUCTION_CHARSET) and 1 <= len(text) <= 64
            assert text == env.unwrapped.instruction


# ---- the expert ----------------------------------------------------------------------------------------
def _assert_expert_rate(name, shift, episodes, seed0):
    env = make_env(name, shift=shift)
    ok, n, failed = expert_success(env, range(seed0, seed0 + episodes))
    rate = ok / n
    print(f"expert success {name} shift={shift or 'none'}: {ok}/{n} = {rate:.3f}")
    assert rate >= REQUIRED_SUCCESS, f"{name} shift={shift}: expert success {ok}/{n}; failing seeds {failed[:20]}"


@pytest.mark.parametrize("name", NAMES)
def test_expert_success_in_distribution(name):
    _assert_expert_rate(name, None, episodes=100, seed0=1000)


@pytest.mark.parametrize("shift", SHIFT_CASES, ids=SHIFT_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_expert_success_under_shift(name, shift):
    _assert_expert_rate(name, shift, episodes=30, seed0=2000)


@pytest.mark.slow
@pytest.mark.parametrize("shift", [None, *SHIFT_CASES], ids=["none", *SHIFT_IDS])
@pytest.mark.parametrize("name", NAMES)
def test_expert_success_statistical(name, shift):
    _assert_expert_rate(name, shift, episodes=300, seed0=100_000)


@pytest.mark.parametrize("shift", [None, "actuator_bias"], ids=["plain", "actuator_bias"])
@pytest.mark.parametrize("name", NAMES)
def test_expert_chunk_leaves_env_unchanged(name, shift):
    env, twin = make_env(name, shift=shift), make_env(name, shift=shift)
    env.reset(seed=21)
    twin.reset(seed=21)
    _expert_steps(env, 2)
    _expert_steps(twin, 2)
    u = env.unwrapped
    first = u.expert_action()
    before = snapshot(env)
    chunk = u.expert_chunk()
    assert_unchanged(env, before)
    assert chunk.shape == (16, u.embodiment_spec.action_dim) and chunk.dtype == np.float32
    assert all(env.action_space.contains(row) for row in chunk)
    np.testing.assert_array_equal(chunk[0], first)
    np.testing.assert_array_equal(u.expert_action(), first)
    np.testing.assert_array_equal(u.expert_chunk(5), chunk[:5])
    # the env still evolves exactly like an identical env that was never asked for a chunk
    a = mid_action(env)
    step_a, step_b = env.step(a), twin.step(a)
    assert_tree_equal(step_a, step_b, "step after expert_chunk")


@pytest.mark.parametrize("shift", [None, "actuator_bias"], ids=["plain", "actuator_bias"])
@pytest.mark.parametrize("name", NAMES)
def test_expert_chunk_is_the_expert_looked_ahead(name, shift):
    """Executing the chunk step by step, the expert proposes exactly the chunk's next row each time."""
    env = make_env(name, seed=4, shift=shift)
    env.reset()
    chunk = env.unwrapped.expert_chunk()
    for row in chunk:
        np.testing.assert_array_equal(env.unwrapped.expert_action(), row)
        _, _, term, trunc, _ = env.step(row)
        if term or trunc:
            break


def test_expert_chunk_zero_length():
    env = make_env("franka", seed=0)
    env.reset()
    try:
        chunk = env.unwrapped.expert_chunk(0)
    except ValueError:
        return
    assert chunk.shape == (0, 7)


# ---- determinism ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [None, ALL_SHIFTS], ids=["plain", "all_shifts"])
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_episode(name, shift):
    """Two envs with the same seed and the same action sequence agree step by step (obs and info)."""
    a, b = make_env(name, seed=17, shift=shift), make_env(name, seed=17, shift=shift)
    assert_tree_equal(a.reset(), b.reset(), "reset")
    # a fixed random action sequence, then the expert's actions (recorded on `a`, replayed on `b`)
    for action in _random_actions(a, 10, seed=3):
        ra, rb = a.step(action), b.step(action)
        assert_tree_equal(ra, rb, f"step {a.unwrapped.t}")
    done = False
    while not done:
        action = a.unwrapped.expert_action()
        ra, rb = a.step(action), b.step(action)
        assert_tree_equal(ra, rb, f"step {a.unwrapped.t}")
        done = ra[2] or ra[3]
    # the next (unseeded) reset continues the same RNG stream in both
    assert_tree_equal(a.reset(), b.reset(), "second reset")


@pytest.mark.parametrize("name", NAMES)
def test_make_env_seed_equals_reset_seed(name):
    for seed in (0, 7, 12345):
        seeded = make_env(name, seed=seed)
        fresh = make_env(name)
        assert_tree_equal(seeded.reset(), fresh.reset(seed=seed), f"seed {seed}")
        assert_tree_equal(seeded.unwrapped._state, fresh.unwrapped._state, "state")


@pytest.mark.parametrize("name", NAMES)
def test_reset_seed_is_independent_of_history(name):
    env = make_env(name, seed=1)
    first = env.reset(seed=99)
    for action in _random_actions(env, 5, seed=0):
        env.step(action)
    env.reset()
    assert_tree_equal(env.reset(seed=99), first, "reset(seed=99) after history")


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_give_different_episodes(name):
    env = make_env(name)
    proprios = {env.reset(seed=s)[0]["proprio"].tobytes() for s in range(8)}
    assert len(proprios) == 8
    # an unseeded env's successive resets differ too
    assert env.reset()[0]["proprio"].tobytes() != env.reset()[0]["proprio"].tobytes()


# ---- bad actions ---------------------------------------------------------------------------------------
def _bad_action(kind: str, env):
    u = env.unwrapped
    d = u.embodiment_spec.action_dim
    a = mid_action(env)
    if kind == "short":
        return a[:-1], rf"shape \({d},\)"
    if kind == "long":
        return np.concatenate([a, a[:1]]), rf"shape \({d},\)"
    if kind == "2d":
        return a[None, :], rf"shape \({d},\)"
    if kind == "scalar":
        return 0.0, rf"shape \({d},\)"
    if kind == "none":
        return None, rf"shape \({d},\)"
    if kind == "nan":
        a[1] = np.nan
        return a, r"non-finite value at dims \[1\]"
    if kind == "inf":
        a[0] = np.inf
        return a, r"non-finite value at dims \[0\]"
    if kind == "neg_inf_list":
        b = a.tolist()
        b[d - 1] = float("-inf")
        return b, rf"non-finite value at dims \[{d - 1}\]"
    if kind == "too_high":
        a[d - 1] = u._high[d - 1] + 0.5 * (u._high[d - 1] - u._low[d - 1])
        return a, rf"dim {d - 1} \({u.embodiment_spec.dim_names[d - 1]}\).*outside"
    if kind == "too_low":
        a[0] = u._low[0] - 1.0
        return a, rf"dim 0 \({u.embodiment_spec.dim_names[0]}\).*outside"
    if kind == "string":
        return "forward", r"got str"
    if kind == "dict":
        return {"dx": 0.0}, r"got dict"
    raise AssertionError(kind)


BAD_KINDS = [
    "short",
    "long",
    "2d",
    "scalar",
    "none",
    "nan",
    "inf",
    "neg_inf_list",
    "too_high",
    "too_low",
    "string",
    "dict",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_action_rejected_and_state_unchanged(name, kind):
    env, twin = make_env(name, seed=8), make_env(name, seed=8)
    env.reset()
    twin.reset()
    _expert_steps(env, 3)
    _expert_steps(twin, 3)
    before = snapshot(env)
    bad, message = _bad_action(kind, env)
    with pytest.raises(ValueError, match=message) as exc:
        env.step(bad)
    assert name in str(exc.value)
    with pytest.raises(ValueError):
        env.unwrapped.validate_action(bad)
    assert_unchanged(env, before)
    # the env continues exactly like one that never saw the bad action
    for _ in range(3):
        action = twin.unwrapped.expert_action()
        assert_tree_equal(env.step(action), twin.step(action), "step after rejected action")


def test_action_of_numeric_strings_rejected():
    env = make_env("franka", seed=0)
    env.reset()
    with pytest.raises(ValueError):
        env.step(["0.0"] * 7)


@pytest.mark.parametrize("name", NAMES)
def test_validate_action_accepts_edges_and_other_dtypes(name):
    env = make_env(name, seed=0)
    env.reset()
    u = env.unwrapped
    for a in (u._low.copy(), u._high.copy(), mid_action(env).astype(np.float64), mid_action(env).tolist()):
        out = u.validate_action(a)
        assert out.dtype == np.float32 and out.shape == u._low.shape
        np.testing.assert_allclose(out, np.asarray(a, dtype=np.float32))
    env.step(u._high.astype(np.float64))


# ---- the distribution shifts ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_unknown_shift_raises_naming_it(name):
    for shift in ("gravity", "lighting+gravity", ["lighting", "gravity"]):
        with pytest.raises(ValueError, match="gravity") as exc:
            make_env(name, shift=shift)
        assert "lighting" in str(exc.value)  # lists the known shifts


def test_parse_shift_forms():
    assert parse_shift(None) == parse_shift("") == parse_shift("none") == frozenset()
    both = frozenset({"lighting", "actuator_bias"})
    assert parse_shift("lighting+actuator_bias") == both
    assert parse_shift("actuator_bias, lighting") == both
    assert parse_shift(["lighting", "actuator_bias"]) == both
    assert parse_shift(ALL_SHIFTS) == frozenset(SHIFTS)
    with pytest.raises(ValueError, match="Lighting"):
        parse_shift("Lighting")


@pytest.mark.parametrize("shift", ["lighting", "camera_offset", "distractors", "actuator_bias"])
@pytest.mark.parametrize("name", NAMES)
def test_observation_shifts_keep_the_episode(name, shift):
    """Shifts other than novel_object draw the same episode: equal state, proprio and instruction."""
    plain, o1, shifted, o2 = _pair(name, shift, seed=31)
    assert shifted.unwrapped.shifts == frozenset({shift})
    assert_tree_equal(plain.unwrapped._state, shifted.unwrapped._state, "state")
    np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
    assert o1["instruction"] == o2["instruction"]
    if shift == "actuator_bias":
        np.testing.assert_array_equal(o1["image"], o2["image"])
    else:
        assert not np.array_equal(o1["image"], o2["image"])


def _colors(img: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(c) for c in px) for px in np.unique(img.reshape(-1, 3), axis=0)}


def _novel_item(name: str, instruction: str) -> tuple[str, tuple[int, int, int]]:
    """The out-of-training word the instruction names and the colour it must be drawn in."""
    words = instruction.split()
    if name == "leap":
        found = [w for w in words if w in NOVEL_OBJECTS]
        assert found, f"leap novel instruction {instruction!r} names no novel object"
        return found[0], render.PALETTE[OBJECTS[found[0]][2]]
    found = [w for w in words if w in render.NOVEL_COLORS]
    assert found, f"{name} novel instruction {instruction!r} names no novel colour"
    return found[0], render.PALETTE[found[0]]


@pytest.mark.parametrize("name", NAMES)
def test_novel_object(name):
    novel_words = set(render.NOVEL_COLORS) | set(NOVEL_OBJECTS) | set(render.NOVEL_SHAPES)
    novel_rgb = {render.PALETTE[c] for c in render.NOVEL_COLORS}
    # in distribution: no novel word in any instruction, no novel colour in any frame
    seen: set[tuple[int, int, int]] = set()
    env = make_env(name)
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        assert not set(obs["instruction"].split()) & novel_words, obs["instruction"]
        frames, done = [obs["image"]], False
        while not done:
            obs, _, term, trunc, _ = env.step(env.unwrapped.expert_action())
            frames.append(obs["image"])
            done = term or trunc
        for f in frames:
            seen |= _colors(f)
    assert not seen & novel_rgb
    if name == "leap":
        for seed in range(40):
            assert env.reset(seed=seed)[0]["instruction"].split()[-1] in TRAIN_OBJECTS
    # novel_object: every instruction names something outside the training set, drawn in an unseen colour
    env = make_env(name, shift="novel_object")
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        _word, rgb = _novel_item(name, obs["instruction"])
        colors = _colors(obs["image"])
        assert rgb in colors, f"seed {seed}: {obs['instruction']!r} but {rgb} is not in the image"
        assert rgb not in seen
        assert colors - seen, "the novel image contains no colour unseen in distribution"


@pytest.mark.parametrize("name", NAMES)
def test_lighting_darkens_and_tints_only_the_image(name):
    plain, o1, lit, o2 = _pair(name, "lighting", seed=41)
    for _ in range(3):
        gain, tint = lit.unwrapped.lighting
        img, ref = o2["image"].astype(float), o1["image"].astype(float)
        np.testing.assert_array_equal(o2["image"], render.apply_lighting(o1["image"], gain, tint))
        assert img.mean() < ref.mean(), "lighting did not darken the image"
        # warm cast: red rises relative to blue
        assert img[..., 0].mean() - img[..., 2].mean() > ref[..., 0].mean() - ref[..., 2].mean()
        np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
        assert_tree_equal(plain.unwrapped._state, lit.unwrapped._state, "state")
        a = plain.unwrapped.expert_action()
        np.testing.assert_array_equal(a, lit.unwrapped.expert_action())
        o1, o2 = plain.step(a)[0], lit.step(a)[0]


@pytest.mark.parametrize("name", NAMES)
def test_camera_offset_shifts_by_declared_pixels(name):
    plain, o1, cam, o2 = _pair(name, "camera_offset", seed=51)
    dx, dy = cam.unwrapped.camera_shift
    assert (dx, dy) != (0, 0)
    for _ in range(3):
        ref, img = o1["image"], o2["image"]
        ys, xs = np.mgrid[0:64, 0:64]
        sy, sx = ys - dy, xs - dx  # the source pixel of every output pixel
        inside = (sy >= 0) & (sy < 64) & (sx >= 0) & (sx < 64)
        expected = np.zeros_like(ref)
        expected[inside] = ref[sy[inside], sx[inside]]
        np.testing.assert_array_equal(img, expected)
        assert (~inside).sum() == 64 * abs(dx) + 64 * abs(dy) - abs(dx * dy)
        np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
        a = plain.unwrapped.expert_action()
        o1, o2 = plain.step(a)[0], cam.step(a)[0]


@pytest.mark.parametrize("name", NAMES)
def test_distractors_add_pixels_only(name):
    plain, o1, cl, o2 = _pair(name, "distractors", seed=61)
    for _ in range(3):
        diff = (o1["image"] != o2["image"]).any(axis=-1)
        assert 5 <= diff.sum() < 0.25 * diff.size, diff.sum()
        # every changed pixel lies on one of the episode's distractors and has a distractor colour
        near = np.zeros_like(diff)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        colors = set()
        for x, y, r, col in cl.unwrapped._state["distractors"]:
            near |= (np.abs(xs - x) <= r + 1.5) & (np.abs(ys - y) <= r + 1.5)
            colors.add(tuple(col))
        assert not (diff & ~near).any()
        assert _colors(o2["image"][diff]) <= colors
        np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
        assert o1["instruction"] == o2["instruction"]
        a = plain.unwrapped.expert_action()
        o1, o2 = plain.step(a)[0], cl.step(a)[0]


@pytest.mark.parametrize("name", NAMES)
def test_actuator_bias(name):
    plain, o1, biased, o2 = _pair(name, "actuator_bias", seed=71)
    u = biased.unwrapped
    bias = np.asarray(type(u).actuator_bias, dtype=np.float32)
    assert bias.shape == (u.embodiment_spec.action_dim,) and np.abs(bias).max() > 0
    np.testing.assert_array_equal(u.bias, bias)
    np.testing.assert_array_equal(plain.unwrapped.bias, 0.0)
    moved_differently = False
    actions = [mid_action(plain), plain.unwrapped.expert_action(), *_random_actions(plain, 3, seed=5)]
    for a in actions:
        o1, _, _, _, i1 = plain.step(a)
        o2, _, _, _, i2 = biased.step(a)
        np.testing.assert_array_equal(i1["executed_action"], a)
        np.testing.assert_allclose(i2["executed_action"], np.clip(a + bias, u._low, u._high), rtol=0, atol=1e-7)
        moved_differently |= not np.array_equal(o1["proprio"], o2["proprio"])
    assert moved_differently, "the same actions moved the biased robot exactly like the plain one"


@pytest.mark.parametrize("name", NAMES)
def test_expert_compensates_actuator_bias(name):
    plain, _, biased, _ = _pair(name, "actuator_bias", seed=81)
    u = biased.unwrapped
    want = plain.unwrapped._expert(plain.unwrapped._state)
    np.testing.assert_allclose(u.expert_action(), np.clip(want - u.bias, u._low, u._high), atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_shifts_compose(name):
    plain, o1, both, o2 = _pair(name, "lighting+actuator_bias", seed=91)
    u = both.unwrapped
    assert u.shifts == frozenset({"lighting", "actuator_bias"})
    for spelled in ("actuator_bias+lighting", ["lighting", "actuator_bias"], "lighting,actuator_bias"):
        other = make_env(name, shift=spelled)
        assert_tree_equal(other.reset(seed=91), both.reset(seed=91), f"shift spelled {spelled!r}")
    gain, tint = u.lighting
    np.testing.assert_array_equal(o2["image"], render.apply_lighting(o1["image"], gain, tint))
    a = mid_action(plain)
    _, _, _, _, info = both.step(a)
    np.testing.assert_allclose(info["executed_action"], np.clip(a + u.bias, u._low, u._high), atol=1e-7)
    assert np.abs(u.bias).max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_all_image_shifts_compose_in_order(name):
    """distractors, then lighting, then the camera offset: the image is offset(lighting(cluttered frame))."""
    _, plain_obs, _, cluttered = _pair(name, "distractors", seed=95)
    env = make_env(name, shift="distractors+lighting+camera_offset")
    obs = env.reset(seed=95)[0]
    gain, tint = env.unwrapped.lighting
    dx, dy = env.unwrapped.camera_shift
    expected = render.apply_offset(render.apply_lighting(cluttered["image"], gain, tint), dx, dy)
    np.testing.assert_array_equal(obs["image"], expected)
    np.testing.assert_array_equal(obs["proprio"], plain_obs["proprio"])
    assert obs["instruction"] == plain_obs["instruction"]


@pytest.mark.xfail(
    strict=True,
    reason="BUG fleet/sim/hello.py:135-152 (HelloEnv._expert) the module docstring promises the navigation-function "
    "expert 'never gets stuck', but on seed 100217 it enters a 2-cycle between (-0.87, -0.39) and (-0.78, -0.33) "
    "in the narrow gap between two obstacles (blocked on the 0.1 m grid by the +0.05 m inflation; the 0.25 m "
    "look-ahead samples cells beyond it) and times out after 80 steps; 1 in 300 episodes (99.7%, the >=98% bar "
    "still holds). Suggested fix: detect no progress in the field value and step towards the lowest-valued "
    "neighbouring grid cell instead of the look-ahead direction",
)
def test_hello_expert_does_not_oscillate_in_a_narrow_gap():
    ok, steps = expert_episode(make_env("hello"), seed=100217)
    assert ok, f"hello expert failed seed 100217 after {steps} steps"


@pytest.mark.parametrize("name", ["franka", "aloha", "hello", "leap"])
def test_focus_points_at_the_named_object(name: str) -> None:
    """`focus()` (the privileged pretraining target) lands on a pixel of the named object's colour, and
    follows the image under `camera_offset`."""
    for seed in range(5):
        env = make_env(name)
        obs, _ = env.reset(seed=seed)
        f = env.unwrapped.focus()
        assert f.shape == (2,) and np.all(np.abs(f) <= 1.0)
        x, y = ((f + 1.0) * 32).astype(int)
        if name != "leap":  # leap's instruction names a shape, not a colour
            colour = next(w for w in obs["instruction"].split() if w in render.PALETTE)
            assert np.abs(obs["image"][y, x].astype(int) - render.PALETTE[colour]).max() < 40, (seed, colour)
        shifted = make_env(name, shift="camera_offset")
        shifted.reset(seed=seed)
        dx, dy = shifted.unwrapped.camera_shift
        assert np.allclose(shifted.unwrapped.focus() - f, np.array([dx, dy]) / 32.0, atol=1e-6)
