"""DeviceBackend's device-generic path on the CPU: static buffers, bucket padding, one transfer each way,
head swaps and half precision, checked against the master model (tests/gpu/ runs the same on CUDA)."""

import numpy as np
import pytest
import torch

from fleet.policy.inference.device_backend import BUCKETS, DeviceBackend, bucket, resolve_device
from fleet.serving.device import check_device, gpu_count
from tests.unit.policy.test_model import MIXED, mixed_batch, tiny_model


def _rows(model_or_backend, batch, k=1, seed=5, temperature=0.0):
    return model_or_backend.predict(
        batch, n_samples=k, temperature=temperature, generator=torch.Generator().manual_seed(seed)
    )


def _max_diff(a, b, key="chunk"):
    return max(float(np.abs(x[key] - y[key]).max()) for x, y in zip(a, b, strict=True))


def test_unpadded_cpu_path_is_bit_identical_to_the_master_model():
    model = tiny_model()
    backend = DeviceBackend(model, device="cpu", pad=False)
    batch = mixed_batch(model, MIXED)
    for k in (1, 3):
        want, got = _rows(model, batch, k), _rows(backend, batch, k)
        assert _max_diff(want, got) == 0.0
        assert _max_diff(want, got, "features") == 0.0
        for w, g in zip(want, got, strict=True):
            assert sorted(w) == sorted(g) and w["embodiment"] == g["embodiment"]
            if "samples" in w:
                assert np.array_equal(w["samples"], g["samples"])
            if "entropy" in w:
                assert np.array_equal(w["entropy"], g["entropy"]) and np.array_equal(w["probs"], g["probs"])


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_padding_to_a_bucket_drops_the_padding_rows(n):
    model = tiny_model(seed=1)
    backend = DeviceBackend(model, device="cpu", pad=True)
    batch = mixed_batch(model, MIXED[:n], seed=n)
    want, got = _rows(model, batch, 2), _rows(backend, batch, 2)
    assert len(got) == n
    assert _max_diff(want, got) < 1e-4  # batch-size dependent float sums only
    # the runners are keyed by bucket: a batch of n ran on the bucket's static buffers
    assert ("backbone", bucket(n)) in backend._graphs


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 64, 64]
    assert bucket(65) == 65 and BUCKETS[-1] == 64


def test_a_head_swap_serves_the_new_head_and_only_it():
    model = tiny_model(seed=2)
    backend = DeviceBackend(model, device="cpu", pad=True)
    batch = mixed_batch(model, MIXED)
    before = _rows(backend, batch)
    with torch.no_grad():
        for p in model.head("aloha").parameters():
            p.add_(0.05)
    model.head_versions["aloha"] = 2
    assert _max_diff(before, _rows(backend, batch)) == 0.0  # the backend serves its own copy until the swap
    backend.install_head("aloha", backend.prepare_head("aloha"), 2)
    after = _rows(backend, batch)
    want = _rows(model, batch)
    assert _max_diff(want, after) < 1e-4
    for b, a in zip(before, after, strict=True):
        changed = not np.array_equal(b["chunk"], a["chunk"])
        assert changed == (a["embodiment"] == "aloha")
    assert backend.head_versions()["aloha"] == 2
    assert {r["head_version"] for r in after if r["embodiment"] == "aloha"} == {2}


def test_word_adapters_and_sampling_run_eagerly_on_the_device():
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.head("franka").word_delta[5:9] = 0.3
    backend = DeviceBackend(model, device="cpu", pad=True)
    batch = mixed_batch(model, MIXED)
    assert _max_diff(_rows(model, batch), _rows(backend, batch)) < 1e-4
    sampled = _rows(backend, batch, temperature=1.0)  # token heads sample from a device generator seeded by the caller
    again = _rows(backend, batch, temperature=1.0)
    assert _max_diff(sampled, again) == 0.0


def test_bf16_stays_close_to_fp32():
    model = tiny_model(seed=4)
    backend = DeviceBackend(model, device="cpu", precision="bf16", pad=True)
    batch = mixed_batch(model, MIXED)
    got, want = _rows(backend, batch), _rows(model, batch)
    for w, g in zip(want, got, strict=True):
        spec = model.specs[w["embodiment"]]
        span = np.asarray(spec.action_high) - np.asarray(spec.action_low)
        assert np.all(np.abs(w["chunk"] - g["chunk"]) <= 0.25 * span)  # a random tiny model: loose; trained: tests/gpu


def test_clear_errors_for_devices_and_precisions():
    model = tiny_model()
    with pytest.raises(ValueError, match="precision: expected one of"):
        DeviceBackend(model, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="'fp16' runs on CUDA only"):
        DeviceBackend(model, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="graphs: CUDA graphs need a CUDA device"):
        DeviceBackend(model, device="cpu", graphs=True)
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N'"):
        check_device("device", "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
    assert (gpu_count("cuda:1"), gpu_count("cpu")) == (1, 0)


def test_serve_config_device_validation_and_gpu_placement():
    from deployments.policy import policy_deployment
    from fleet.serving.config import ServeConfig

    assert ServeConfig().device == "cpu" and ServeConfig().replica_gpus == 0
    cuda = ServeConfig(device="cuda:1", precision="fp16")
    assert cuda.replica_gpus == 1
    assert policy_deployment(cuda).ray_actor_options["num_gpus"] == 1
    assert policy_deployment({}).ray_actor_options["num_gpus"] == 0
    with pytest.raises(ValueError, match="ServeConfig.device: expected 'cpu', 'cuda' or 'cuda:N'"):
        ServeConfig(device="tpu")
    with pytest.raises(ValueError, match="ServeConfig.backend: expected 'torch' with device 'cuda'"):
        ServeConfig(device="cuda", backend="onnx")
    with pytest.raises(ValueError, match="ServeConfig.precision"):
        ServeConfig(device="cuda", precision="int8")
    with pytest.raises(ValueError, match="ServeConfig.precision"):
        ServeConfig(precision="fp16")  # fp16 only on a CUDA device


def test_runtime_serves_through_the_device_backend():
    from fleet.policy.checkpoint import head_to_bytes
    from fleet.protocol import make_request
    from fleet.serving.runtime import PolicyRuntime
    from fleet.sim import make_env

    model = tiny_model(seed=6)
    runtime = PolicyRuntime(model=model, threads=1, device="cpu")
    assert runtime.stats()["device"] == "cpu"
    # what a CUDA replica builds, on the CPU: the runtime's batching, validation and head swaps over it
    runtime.backend = DeviceBackend(model, device="cpu", pad=True)
    env = make_env("aloha")
    obs, _ = env.reset(seed=1)
    requests = [make_request("r0", "aloha", obs, n_samples=2), {"robot_id": "bad"}]
    replies = runtime.act_batch(requests)
    assert replies[0]["chunk"].shape == (model.config.chunk_size, 14) and "error" in replies[1]
    donor = tiny_model(seed=7)
    runtime.set_head("aloha", 5, head_to_bytes(donor, "aloha"))
    swapped = runtime.act_batch(requests[:1])[0]
    assert swapped["head_version"] == 5 and not np.array_equal(swapped["chunk"], replies[0]["chunk"])


def test_adaptation_rounds_take_a_device():
    from fleet.learning.head_training import _device
    from fleet.learning.round_config import AdaptConfig

    assert AdaptConfig(device="cuda:0").device == "cuda:0"
    with pytest.raises(ValueError, match="AdaptConfig.device: expected 'cpu', 'cuda' or 'cuda:N'"):
        AdaptConfig(device="gpu")
    assert _device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            _device("cuda")


def test_per_row_samples_and_committed_prefixes():
    from fleet.policy.batch import set_row_options

    model = tiny_model(seed=8)
    backend = DeviceBackend(model, device="cpu", pad=True)
    batch = mixed_batch(model, MIXED)
    ks = [1, 4, 1, 2, 4, 1, 3, 1]
    set_row_options(batch, model.specs, n_samples=ks)
    rows = _rows(backend, batch, k=4)
    for r, k in zip(rows, ks, strict=True):
        if model.specs[r["embodiment"]].head == "flow" and k > 1:
            assert r["samples"].shape[0] == k and np.isfinite(r["samples"]).all()
        else:
            assert "samples" not in r
    # a committed prefix: its group runs on the master head, the others stay on the device path
    batch = mixed_batch(model, MIXED)
    spec = model.specs["aloha"]
    prefix = (
        np.random.default_rng(0).uniform(spec.action_low, spec.action_high, (3, spec.action_dim)).astype(np.float32)
    )
    set_row_options(batch, model.specs, prefixes=[None, (prefix, 2), None, None, None, None, None, None])
    got, want = _rows(backend, batch, k=2), _rows(model, batch, k=2)
    assert len(got) == len(MIXED)
    for g, w in zip(got, want, strict=True):
        if g["embodiment"] in ("franka", "hello"):
            assert np.array_equal(g["chunk"], w["chunk"])  # token heads: no noise, same path
    assert got[1]["head_version"] == model.head_versions["aloha"]
    plain = _rows(backend, mixed_batch(model, MIXED), k=2)
    span = np.asarray(spec.action_high) - np.asarray(spec.action_low)
    guided_err = (np.abs(got[1]["chunk"][:2] - prefix[:2]) / span).max()
    plain_err = (np.abs(plain[1]["chunk"][:2] - prefix[:2]) / span).max()
    assert guided_err < 0.25 * plain_err, (guided_err, plain_err)  # the committed steps follow the prefix
