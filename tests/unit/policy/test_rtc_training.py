"""Training-time RTC: committed steps given (not predicted) in both heads' losses, a flow head marked
rtc-trained clamps them when sampling, the mark survives a checkpoint, and one round on a tiny policy changes
that head alone."""

import dataclasses

import numpy as np
import pytest
import torch

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import load_checkpoint, save_checkpoint
from fleet.policy.model import FleetPolicy
from fleet.policy.rtc import GroupPrefix
from fleet.policy.tokenizer import default_vocabulary
from tests.mocks.tiny_policy import TINY

torch.set_num_threads(1)

CFG = dataclasses.replace(TINY, n_euler=5, flow_train_noise=3)


def tiny(seed: int = 0) -> FleetPolicy:
    torch.manual_seed(seed)
    return FleetPolicy(CFG, dict(EMBODIMENTS), default_vocabulary()).eval()


def memory_for(model: FleetPolicy, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(b, 7, model.config.d_model, generator=g)
    return memory, torch.zeros(b, 7, dtype=torch.bool)


def targets(head, b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, head.chunk_size, head.action_dim, generator=g) * 2 - 1


def test_flow_velocity_takes_one_time_per_step():
    head = tiny().head("aloha")
    memory, pad = memory_for(tiny(), 3)
    kvs, mask, direct = head.memory_context(memory, pad)
    x = targets(head, 3)
    t = torch.tensor([0.1, 0.5, 0.9])
    per_step = t[:, None].expand(-1, head.chunk_size)
    with torch.no_grad():
        torch.testing.assert_close(
            head.velocity(x, per_step, kvs, mask, direct), head.velocity(x, t, kvs, mask, direct)
        )


def test_flow_loss_gives_committed_steps_clean_at_time_one_and_leaves_them_out():
    model = tiny()
    head = model.head("aloha")
    memory, pad = memory_for(model, 4)
    actions = targets(head, 4)
    committed = torch.tensor([0, 1, 3, 0])
    seen = []
    velocity = head.velocity

    def spy(x, t, *rest):
        seen.append((x.detach().clone(), t.detach().clone()))
        return velocity(x, t, *rest)

    head.velocity = spy
    none = head.loss(memory, pad, actions, torch.Generator().manual_seed(0))[0]
    zero = head.loss(
        memory, pad, actions, torch.Generator().manual_seed(0), committed=torch.zeros(4, dtype=torch.long)
    )[0]
    torch.testing.assert_close(zero, none)  # nothing committed: the plain loss
    head.loss(memory, pad, actions, torch.Generator().manual_seed(0), committed=committed)
    x, t = seen[-1]
    n = CFG.flow_train_noise
    for row, d in enumerate(committed.repeat_interleave(n).tolist()):
        assert torch.equal(x[row, :d], actions[row // n, :d]) and bool((t[row, :d] == 1.0).all())
        assert bool((t[row, d:] < 1.0).all())
    # the committed steps' own error does not count: a velocity that is wrong only there costs nothing
    head.velocity = lambda x, t, *rest: torch.where(
        (t == 1.0)[..., None], torch.full_like(x, 1e3), velocity(x, t, *rest)
    )
    masked = head.loss(memory, pad, actions, torch.Generator().manual_seed(0), committed=committed)[0]
    assert float(masked.detach()) < 100.0


def test_token_loss_leaves_committed_steps_out():
    model = tiny()
    head = model.head("franka")
    memory, pad = memory_for(model, 3)
    actions = targets(head, 3)
    plain = head.loss(memory, pad, actions, None)[0]
    zero = head.loss(memory, pad, actions, None, committed=torch.zeros(3, dtype=torch.long))[0]
    torch.testing.assert_close(zero, plain)
    committed = torch.tensor([2, 0, 5])
    got = head.loss(memory, pad, actions, None, committed=committed)[0]
    bins = head.to_bins(actions)
    logits = head.teacher_forced_logits(memory, pad, bins)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, head.n_bins), bins.reshape(-1), reduction="none")
    ce = ce.reshape(bins.shape) * head.step_weights(ce)[None, :, None]
    keep = torch.arange(head.chunk_size)[None] >= committed[:, None]
    torch.testing.assert_close(got, ce[keep].sum() / (keep.sum() * head.action_dim))


def test_rtc_trained_flow_head_clamps_the_committed_steps():
    model = tiny()
    head = model.head("aloha")
    memory, pad = memory_for(model, 3)
    target = targets(head, 3, seed=4)
    prefix = GroupPrefix(target, torch.tensor([5, 0, 4]), torch.tensor([2, 0, 3]))
    ks = torch.tensor([2, 2, 2])
    guided = head.sample_rows(memory, pad, ks, torch.Generator().manual_seed(0), prefix)
    model.mark_rtc_trained("aloha")
    assert head.config.rtc_trained == ("aloha",) and model.config.rtc_trained == ("aloha",)
    clamped = head.sample_rows(memory, pad, ks, torch.Generator().manual_seed(0), prefix)
    plain = head.sample_rows(memory, pad, ks, torch.Generator().manual_seed(0))
    for row, d in enumerate([2, 0, 3]):
        for k in range(2):
            assert torch.equal(clamped[2 * row + k, :d], target[row, :d])
    torch.testing.assert_close(clamped[2:4], plain[2:4])  # a row without a prefix samples as before
    assert not torch.allclose(clamped[:2], guided[:2])  # not the guided path


def test_an_rtc_trained_flow_head_executes_its_first_sample_and_a_token_head_is_unchanged():
    model = tiny()
    head = model.head("aloha")
    memory, pad = memory_for(model, 2)
    prefix = GroupPrefix(targets(head, 2, seed=4), torch.tensor([4, 4]), torch.tensor([2, 1]))
    before = head.predict(memory, pad, 4, 0.0, torch.Generator().manual_seed(0), prefix=prefix)
    torch.testing.assert_close(before["chunk"], before["samples"].mean(1).clamp(-1, 1))  # the mean of K
    model.mark_rtc_trained("aloha")
    model.mark_rtc_trained("franka")  # a token head: nothing to pick
    assert model.config.flow_execute_sample == ("aloha",) and head.config.flow_execute_sample == ("aloha",)
    after = head.predict(memory, pad, 4, 0.0, torch.Generator().manual_seed(0), prefix=prefix)
    torch.testing.assert_close(after["chunk"], after["samples"][:, 0].clamp(-1, 1))
    assert not torch.allclose(after["chunk"], before["chunk"])


def test_the_mark_survives_a_checkpoint_and_names_a_body(tmp_path):
    model = tiny()
    model.mark_rtc_trained("leap")
    model.mark_rtc_trained("franka")
    assert model.config.rtc_trained == ("franka", "leap")
    save_checkpoint(model, tmp_path / "p.safetensors")
    loaded, _ = load_checkpoint(tmp_path / "p.safetensors")
    assert loaded.config.rtc_trained == ("franka", "leap") and loaded.head("leap").config.rtc_trained == (
        "franka",
        "leap",
    )
    assert loaded.config.flow_execute_sample == ("leap",)  # the flow head's; franka's is a token head
    with pytest.raises(ValueError, match="mark_rtc_trained: no embodiment 'ur5'"):
        model.mark_rtc_trained("ur5")
    with pytest.raises(ValueError, match="PolicyConfig.rtc_trained must be a tuple of embodiment names"):
        dataclasses.replace(CFG, rtc_trained=(1,))


def test_one_round_on_a_tiny_policy_changes_that_head_alone():
    from fleet.learning.rtc_round import collect_rtc_rows, train_rtc_head

    model = tiny()
    rows = collect_rtc_rows(model, "franka", episodes=2, delays=(2,), clean_episodes=1, n_envs=2)
    assert rows.episodes == 2 and len(rows) > 4
    committed = np.array(rows.committed)
    assert committed.max() == 2 and (committed == 0).any()  # later requests commit 2; clean rows none
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = train_rtc_head(model, "franka", rows, steps=3, log_every=1)
    assert report.steps == 3 and len(report.losses) == 3 and report.rows == len(rows)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.franka.") for k in changed)
    assert model.config.rtc_trained == ("franka",)
    with pytest.raises(ValueError, match="rows: expected rows of 'aloha'"):
        train_rtc_head(model, "aloha", rows, steps=1)


def test_rows_replan_at_an_interval_drawn_per_episode():
    from fleet.learning.rtc_round import collect_rtc_rows

    model = tiny()
    every2 = collect_rtc_rows(model, "franka", episodes=1, delays=(0,), replans=(2,), n_envs=1)
    every8 = collect_rtc_rows(model, "franka", episodes=1, delays=(0,), replans=(8,), n_envs=1)
    own = collect_rtc_rows(model, "franka", episodes=1, delays=(0,), n_envs=1)  # franka's recompute_every, 4
    assert len(every2) > len(own) > len(every8) > 0  # a request every 2, 4 or 8 ticks of the episode
    with pytest.raises(ValueError, match="replans"):
        collect_rtc_rows(model, "franka", episodes=1, replans=(0,))
    with pytest.raises(ValueError, match="replans"):
        collect_rtc_rows(model, "franka", episodes=1, replans=())


def test_finetuning_replans_at_the_bodys_own_interval_and_half_of_it_unless_told():
    from fleet.learning.rtc_round import default_replans, rtc_finetune

    assert default_replans(EMBODIMENTS["franka"]) == (2, 4)  # every simulated body replans every 4 ticks
    assert default_replans(dataclasses.replace(EMBODIMENTS["franka"], recompute_every=1)) == (1,)
    assert default_replans(dataclasses.replace(EMBODIMENTS["franka"], recompute_every=5)) == (2, 5)
    result = rtc_finetune(tiny(), {}, ["franka"], episodes=2, clean_episodes=0, steps=1, rounds=1)
    assert result["bodies"]["franka"]["replans"] == [2, 4]
    result = rtc_finetune(tiny(), {}, ["franka"], episodes=2, clean_episodes=0, steps=1, rounds=1, replans=(3,))
    assert result["bodies"]["franka"]["replans"] == [3]
    for bad in (0.0, -1.0, float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="lr: expected a positive finite number"):
            rtc_finetune(tiny(), {}, ["franka"], episodes=1, clean_episodes=0, steps=1, rounds=1, lr=bad)
