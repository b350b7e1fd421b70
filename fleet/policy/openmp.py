"""How torch's OpenMP threads wait at a barrier: call `set_omp_wait_policy()` before torch is imported.

OpenMP threads that busy-wait at every barrier are a disaster on a small shared machine: with torch on
2 threads and anything else busy on one of the 2 cores (a Ray actor, a second replica), every parallel
region waits for a descheduled spinner. Measured here: a training step took 10.4 s instead of 0.32 s.
So every process waits passively, except `fleet pretrain` on more than one thread, which assumes it owns
the cores (the documented reproduction; `--threads 1` is for shared machines and never waits at a
barrier): there libgomp's default short spin keeps steps 30 % faster (pretraining batch of 64 on 2 quiet
cores, fused AdamW: 0.37 s passive, 0.26 s with the default spin). It must be set before torch loads its
OpenMP runtime, so the entry points call it first: the `fleet` command (fleet.cli.main), the policy server
replicas (deployments/policy.py) and the learner actor (actors/learner.py). An explicit setting in the
environment wins (OMP_WAIT_POLICY, or GOMP_SPINCOUNT).

`lower_priority` renices a whole process (every thread) for background work that must yield the cores, such as
the onboarding actor's training beside realtime robots.
"""

from __future__ import annotations

import os
import sys


def owns_the_cores(argv: list[str]) -> bool:
    """True for `fleet pretrain` on more than one thread (`--threads` other than 1; the default is 2)."""
    args = argv[1:]
    if not args or args[0] != "pretrain" or not os.path.basename(argv[0]).startswith("fleet"):
        return False
    for i, a in enumerate(args):
        if a == "--threads" and i + 1 < len(args):
            return args[i + 1] != "1"
        if a.startswith("--threads="):
            return a.split("=", 1)[1] != "1"
    return True


def set_omp_wait_policy(argv: list[str] | None = None) -> None:
    """OMP_WAIT_POLICY=PASSIVE for this process and its children, unless the environment already says how
    to wait or `argv` (default sys.argv) is a `fleet pretrain` that owns the cores."""
    if "GOMP_SPINCOUNT" not in os.environ and not owns_the_cores(sys.argv if argv is None else argv):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def lower_priority(niceness: int, idle: bool = False) -> int | None:
    """Give every thread of this process (Linux niceness and scheduling policy are per thread; threads started
    later inherit their creator's) at least `niceness`, and with `idle` Linux's SCHED_IDLE policy: the thread then
    runs only on a core nothing else wants, where niceness alone still leaves it a share against busy threads
    (nice 19 against Ray's workers at 15: 15 / (15 + 36) of a contested core). Returns the process's niceness
    after, None where it cannot be read."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    sched_idle = getattr(os, "SCHED_IDLE", None) if idle else None
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
            if sched_idle is not None:
                os.sched_setscheduler(tid, sched_idle, os.sched_param(0))
        except OSError:  # a thread that ended meanwhile, or a platform without per-thread priorities
            pass
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        return None
