"""Benchmarks: the Worker (``python -m trainer``, public config only) against a hand-written loop.

Run ``python -m bench --help`` (``make bench``); docs/benchmarks.md explains what is measured.
Every timed run is a fresh child process started with the user's environment, so each side
chooses its own settings (the Worker its ``OMP_WAIT_POLICY``, the hand-written script none).
"""
