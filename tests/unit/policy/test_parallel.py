"""Data-parallel pretraining (no Ray): the averaged gradient of two ranks equals the one-process gradient,
demonstrations broadcast exactly, ranks stay in sync, and a bad configuration is refused."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fleet.policy import parallel  # noqa: E402
from fleet.policy.checkpoint import load_checkpoint  # noqa: E402
from fleet.policy.demos import DemoSet, collect  # noqa: E402
from fleet.policy.train import PretrainConfig, default_workers, pretrain  # noqa: E402
from tests.unit.policy.test_model import mixed_batch, tiny_model  # noqa: E402

NAMES = ["franka", "hello", "franka", "hello"]  # token heads: a deterministic loss (no flow noise)
KEYS = ("images", "proprio", "actions", "focus")


def _run_ranks(target, *args) -> None:
    """Run target(rank, store, *args) in two spawned processes and wait for both."""
    store = parallel.rendezvous_file()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, store, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]


def _grad_rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    parallel.init(rank, 2, store)
    try:
        model = tiny_model(seed=rank)  # different seeds: broadcast_params must make them equal
        parallel.broadcast_params(model)
        model.train()
        full = mixed_batch(model, NAMES, seed=3, with_actions=True)
        rows = [0, 1] if rank == 0 else [2, 3]  # each rank: one row of each body
        idx = torch.tensor(rows)
        half = dataclasses.replace(
            full,
            image=full.image[idx],
            proprio=full.proprio[idx],
            instr_ids=full.instr_ids[idx],
            emb_idx=full.emb_idx[idx],
            embodiments=[NAMES[i] for i in rows],
            actions=full.actions[idx],
            _groups=None,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        loss, _ = model.action_loss(half)
        loss.backward()
        mean_loss = parallel.average_gradients(params, loss, 2)
        averaged = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        parallel.check_in_sync(model)
        if rank == 0:
            model.zero_grad(set_to_none=True)
            ref_loss, _ = model.action_loss(full)
            ref_loss.backward()
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
            err = max(float((averaged[n] - p.grad).abs().max()) for n, p in named)
            scale = max(float(p.grad.abs().max()) for _, p in named)
            with open(out, "w") as f:
                json.dump({"err": err, "scale": scale, "loss": mean_loss, "ref_loss": float(ref_loss)}, f)
    finally:
        parallel.shutdown()


def test_two_ranks_average_to_the_one_process_gradient(tmp_path):
    out = tmp_path / "grad.json"
    _run_ranks(_grad_rank, str(out))
    r = json.loads(out.read_text())
    assert r["scale"] > 0
    assert r["err"] <= 1e-5 * max(1.0, r["scale"]), r
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)


def _share_rank(rank: int, store: str, out: str) -> None:
    parallel.init(rank, 2, store)
    try:
        owner = {"aloha": 0, "leap": 1}
        mine = {n: collect(n, 2, seed=5 + i) for i, n in enumerate(owner) if owner[n] == rank}
        shared = parallel.share_demos(mine, owner, ("aloha", "leap"))
        with open(f"{out}.{rank}.npz", "wb") as f:
            np.savez(
                f,
                **{f"{n}_{k}": getattr(d, k) for n, d in shared.items() for k in KEYS},
                **{f"{n}_meta": np.array([d.successes, d.episodes, len(d)]) for n, d in shared.items()},
                **{f"{n}_instr": np.array(d.instructions) for n, d in shared.items()},
            )
    finally:
        parallel.shutdown()


def test_share_demos_gives_every_rank_the_collector_s_data(tmp_path):
    out = str(tmp_path / "demos")
    _run_ranks(_share_rank, out)
    got = [np.load(f"{out}.{r}.npz") for r in range(2)]
    for i, name in enumerate(("aloha", "leap")):
        ref: DemoSet = collect(name, 2, seed=5 + i)
        for g in got:
            for k in ("images", "proprio", "actions", "focus"):
                assert np.array_equal(g[f"{name}_{k}"], getattr(ref, k)), (name, k)
            assert g[f"{name}_meta"].tolist() == [ref.successes, ref.episodes, len(ref)]
            assert g[f"{name}_instr"].tolist() == ref.instructions


def test_assign_balances_collection_and_split_rows():
    owner = parallel.assign(("franka", "aloha", "hello", "leap"), 2)
    assert owner["aloha"] != owner["leap"] and len(set(owner.values())) == 2
    assert set(parallel.assign(("franka", "leap"), 1).values()) == {0}
    assert parallel.split_rows({"franka": 16, "hello": 8}, 2) == {"franka": 8, "hello": 4}


def test_config_refuses_workers_it_cannot_split_evenly():
    with pytest.raises(ValueError, match="workers must be between 1 and threads"):
        PretrainConfig(threads=1, workers=2)
    with pytest.raises(ValueError, match=r"uneven \{'franka': 7"):
        PretrainConfig(embodiments=("franka", "leap"), batch_size=14, workers=2)
    assert PretrainConfig(batch_size=64, workers=2).rows() == dict.fromkeys(("franka", "aloha", "hello", "leap"), 16)
    assert default_workers(PretrainConfig(batch_size=56, mix={"hello": 0.5})) == 2
    assert default_workers(PretrainConfig(batch_size=60)) == 1  # 15 rows each: one process
    assert default_workers(PretrainConfig(threads=1)) == 1


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_two_worker_pretrain_trains_on_the_same_data_as_one(tmp_path, keep_threads):
    """Same seed, no DAgger: both runs collect the same demonstrations (split over ranks or not); the
    two-worker run ends in sync (checked inside) and writes a loadable checkpoint."""
    base = dict(
        embodiments=("franka", "leap", "aloha"),
        steps=4,
        batch_size=6,
        warmup=1,
        demo_episodes=3,
        dagger_rounds=0,
        threads=2,
    )
    _, one, _ = pretrain(PretrainConfig(**base, workers=1), progress=False, log=lambda m: None)
    logs: list[str] = []
    model, two, _ = pretrain(PretrainConfig(**base, workers=2), out=tmp_path, progress=False, log=logs.append)
    assert two.samples == one.samples
    assert any("data-parallel over 2 processes" in m for m in logs)
    assert torch.get_num_threads() == 2  # restored for what the caller runs next (evaluation)
    loaded, _ = load_checkpoint(tmp_path / "policy")
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert np.isfinite([v for _, v in two.losses]).all()
