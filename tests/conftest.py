"""Shared pytest configuration: keep torch and BLAS to the machine's two cores, and let OpenMP wait passively
(as every `fleet` process but a pretraining one does; fleet.policy.openmp) before any test imports torch."""

import os

from fleet.policy.openmp import set_omp_wait_policy

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
set_omp_wait_policy()
