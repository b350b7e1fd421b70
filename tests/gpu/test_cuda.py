"""The device path on a real GPU: the same checks as tests/unit/policy/inference/test_device_backend.py, plus CUDA
graphs, half precision and a hot swap while serving. Skipped, with the reason, where torch sees no CUDA device;
`python -m fleet.bench.gpu` runs this module and the GPU figures on a lent GPU machine."""

import threading

import numpy as np
import pytest
import torch

from fleet.bench.infer_measure import action_diffs, observations
from fleet.policy.default import load_policy
from fleet.policy.inference.device_backend import DeviceBackend

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): "
    "the device path's CPU twin runs in tests/unit/policy/inference/test_device_backend.py",
)
NAMES = ["franka", "aloha", "hello", "leap"]


@pytest.fixture(scope="module")
def model():
    return load_policy(None)[0]


@pytest.fixture(scope="module")
def pools():
    return observations(NAMES, 8, seed=3)


def _batch(model, pools, n):
    names = [NAMES[i % 4] for i in range(n)]
    return model.collate([pools[nm][i // 4 % 8] for i, nm in enumerate(names)], names)


def _predict(backend, batch, k=4):
    return backend.predict(batch, n_samples=k, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [1, 3, 16, 64])
def test_graphs_fp32_match_the_cpu_master(model, pools, n):
    backend = DeviceBackend(model, device="cuda", precision="fp32", graphs=True)
    batch = _batch(model, pools, n)
    d = action_diffs(model, _predict(backend, batch), _predict(model, batch))
    assert np.percentile(d, 99) <= 0.01, f"p99 action difference {np.percentile(d, 99):.4f} of the range"
    assert backend.captures > 0


def test_graphs_equal_eager_on_the_device(model, pools):
    graphs = DeviceBackend(model, device="cuda", graphs=True)
    eager = DeviceBackend(model, device="cuda", graphs=False, pad=True)
    batch = _batch(model, pools, 7)
    d = action_diffs(model, _predict(graphs, batch), _predict(eager, batch))
    assert d.max() <= 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_within_one_percent(model, pools, precision):
    backend = DeviceBackend(model, device="cuda", precision=precision, graphs=True)
    batch = _batch(model, pools, 32)
    d = action_diffs(model, _predict(backend, batch), _predict(model, batch))
    assert d.mean() <= 0.01, f"{precision}: mean action difference {d.mean():.4f} of the range"


def test_hot_swap_recaptures_while_the_old_graphs_serve(model, pools):
    import copy

    master = copy.deepcopy(model)
    backend = DeviceBackend(master, device="cuda", graphs=True)
    batch = _batch(master, pools, 8)
    errors, calls = [], [0]
    stop = threading.Event()
    lock = threading.Lock()  # the runtime's forward lock: a batch and install_head never overlap

    def serve():
        while not stop.is_set():
            try:
                with lock:
                    _predict(backend, batch)
                calls[0] += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with torch.no_grad():
        for p in master.head("aloha").parameters():
            p.add_(0.02)
    prepared = backend.prepare_head("aloha")  # captures off the serving path
    with lock:
        backend.install_head("aloha", prepared, 9)
    stop.set()
    thread.join(10)
    assert not errors and calls[0] > 0
    rows = _predict(backend, batch)
    assert {r["head_version"] for r in rows if r["embodiment"] == "aloha"} == {9}
    d = action_diffs(master, rows, _predict(master, batch))
    assert np.percentile(d, 99) <= 0.01


def test_an_adaptation_round_trains_on_the_device():
    from fleet.learning.head_adapter import HeadAdapter
    from fleet.learning.round_config import AdaptConfig
    from fleet.policy.demos import collect
    from fleet.policy.train import build_model
    from tests.mocks.tiny_policy import TINY
    from tests.unit.learning.test_adapt import FAST, corrections

    demo = collect("aloha", 2, seed=12, keep=0.3)
    model = build_model(("aloha",), seed=0, config=TINY).eval()
    adapter = HeadAdapter(model, "aloha", demo.subset(np.arange(0, len(demo), 2)), AdaptConfig(**FAST, device="cuda"))
    result = adapter.round(corrections(demo, range(1, len(demo), 2)))
    assert result.metrics["after"]["holdout"] < result.metrics["before"]["holdout"]
    assert all(v.device.type == "cpu" for v in result.state.values())  # the candidate comes back to the host
