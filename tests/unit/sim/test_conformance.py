"""The simulated robots as gymnasium environments: spaces, check_env, rollout invariants, time limits,
success that means the task is done, instructions from the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from fleet.embodiments import get_embodiment
from fleet.sim import INSTRUCTION_WORDS, env_names, make_env
from fleet.sim.base import INSTRUCTION_CHARSET
from tests.mocks.sim_helpers import NAMES, mid_action
from tests.unit.sim.helpers import ALL_SHIFTS, random_actions


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
            actions = iter(random_actions(env, limit, seed))
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
        for a in random_actions(env, limit, seed=seed):
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
