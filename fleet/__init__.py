"""vla-fleet: one multi-embodiment VLA policy served to a fleet of robots on Ray.

The core library (this package) imports neither Ray nor, for the control layer, torch; the Ray
adapters live in `actors/` and `deployments/`, and `fleet.launcher` / `fleet.cli` import Ray lazily.
"""

import os as _os

# OpenMP threads that busy-wait at every barrier are a disaster on a small shared machine: with torch on
# 2 threads and anything else busy on one of the 2 cores (a Ray actor, a second replica), every parallel
# region waits for a descheduled spinner. Measured here: a training step took 10.4 s instead of 0.32 s.
# Passive waiting costs nothing measurable when the machine is quiet. It must be set before torch loads
# its OpenMP runtime, which is why it lives here (every entry point imports `fleet` first); an explicit
# setting in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
