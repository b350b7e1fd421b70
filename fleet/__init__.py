"""vla-fleet: one multi-embodiment VLA policy served to a fleet of robots on Ray.

The core library (this package) imports neither Ray nor, for the control layer, torch; the Ray
adapters live in `actors/` and `deployments/`, and `fleet.cluster` / `fleet.cli` import Ray lazily.
Importing it has no side effects: the entry points set up the process themselves (fleet.policy.openmp).
"""

__version__ = "0.1.0"
