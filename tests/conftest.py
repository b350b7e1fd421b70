"""Shared pytest configuration: keep torch and BLAS to the machine's two cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
