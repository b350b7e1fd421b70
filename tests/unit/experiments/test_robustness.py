"""The robustness experiment's pieces: AUROC, and first observations of exactly the evaluated scenes."""

import numpy as np
import pytest

from fleet.embodiments import get_embodiment
from fleet.experiments.robustness import auroc, first_observations, format_table
from fleet.policy.evaluate import evaluate


def test_auroc_known_values():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2, 2]) == 0.5
    assert auroc([2], [2]) == 0.5  # ties count half
    assert auroc([1, 2, 3], [0, 2.5]) == pytest.approx(4 / 6)  # 1>0, 2>0, 3>0, 3>2.5


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="both sides"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        auroc([float("nan")], [1.0])


def test_first_observations_are_the_scenes_evaluate_runs():
    seen = []
    spec = get_embodiment("hello")

    def policy(obs, names):
        seen.extend(o["image"].copy() for o in obs if len(seen) < 3)
        return [np.zeros((spec.chunk_size, spec.action_dim), np.float32) for _ in obs]

    evaluate(policy, "hello", 3, shift="lighting", seed=4, n_envs=3)
    firsts = first_observations("hello", "lighting", 3, seed=4)
    for a, b in zip(seen[:3], firsts, strict=True):
        np.testing.assert_array_equal(a, b["image"])


def test_format_table_fits_80_columns():
    result = {
        "seed": 3,
        "episodes": 10,
        "ood_episodes": 10,
        "success": {"franka": {s: {"success_rate": 0.5} for s in ("none", "lighting", "camera_offset", "distractors")}},
        "detection": {"franka": {s: {"feature": 0.7, "image": 1.0} for s in ("lighting", "camera_offset")}},
    }
    text = format_table(result)
    assert "50.0%" in text and "0.70/1.00" in text
    assert max(len(line) for line in text.splitlines()) <= 80
