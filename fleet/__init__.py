"""vla-fleet: one multi-embodiment VLA policy served to a fleet of robots on Ray.

The core library (this package) imports neither Ray nor, for the control layer, torch; the Ray
adapters live in `actors/` and `deployments/`, and `fleet.launcher` / `fleet.cli` import Ray lazily.
"""

import os as _os
import sys as _sys

# OpenMP threads that busy-wait at every barrier are a disaster on a small shared machine: with torch on
# 2 threads and anything else busy on one of the 2 cores (a Ray actor, a second replica), every parallel
# region waits for a descheduled spinner. Measured here: a training step took 10.4 s instead of 0.32 s.
# So every process waits passively, except `fleet pretrain` on more than one thread, which assumes it owns
# the cores (the documented reproduction; `--threads 1` is for shared machines and never waits at a
# barrier): there libgomp's default short spin keeps steps 30 % faster (pretraining batch of 64 on 2 quiet
# cores, fused AdamW: 0.37 s passive, 0.26 s with the default spin). It must be set before torch loads its
# OpenMP runtime, which is why it lives here (every entry point imports `fleet` first); an explicit
# setting in the environment wins.


def _owns_the_cores(argv: list[str]) -> bool:
    args = argv[1:]
    if not args or args[0] != "pretrain" or not _os.path.basename(argv[0]).startswith("fleet"):
        return False
    for i, a in enumerate(args):
        if a == "--threads" and i + 1 < len(args):
            return args[i + 1] != "1"
        if a.startswith("--threads="):
            return a.split("=", 1)[1] != "1"
    return True


if "GOMP_SPINCOUNT" not in _os.environ and not _owns_the_cores(_sys.argv):
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
