"""Device names for the policy server and the learner, checked without torch (ServeConfig, CLI options).

"cpu", "cuda" or "cuda:N". Whether the device exists is only known where torch runs: the replica
(`fleet.policy.inference.device_backend.resolve_device`) checks that and refuses with the devices it sees.
"""

from __future__ import annotations

import re

from fleet.validate import fail

DEVICE_HELP = "'cpu', 'cuda' or 'cuda:N' (N a GPU index)"
PATTERN = re.compile(r"^(cpu|cuda(:\d{1,2})?)$")


def check_device(field: str, value: object) -> str:
    """`value` when it names a device (see DEVICE_HELP), else ValueError naming `field`."""
    if not isinstance(value, str) or not PATTERN.match(value):
        fail(field, DEVICE_HELP, value)
    return value


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def gpu_count(device: str) -> int:
    """GPUs a Ray worker on `device` reserves: 1 for a CUDA device, else 0 (so placement and device agree)."""
    return 1 if is_cuda(device) else 0
