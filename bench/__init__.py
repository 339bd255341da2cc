"""Benchmarks of the Worker's training step against the plainest hand-written PyTorch loop.

Run ``python -m bench --help`` (``make bench``); docs/benchmarks.md explains what is measured.

Importing :mod:`trainer` first sets ``OMP_WAIT_POLICY=PASSIVE`` before anything imports torch, so
the Worker and the hand-written loop (same process, or children that inherit the environment) run
under the same OpenMP settings.
"""

import trainer  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
