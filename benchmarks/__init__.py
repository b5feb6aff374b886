"""fastpeft's benchmark harness (``fastpeft bench``) and pytest-benchmark suites.

This folder is not installed with the package: ``fastpeft.cli.bench.load_benchmarks()`` finds it
next to the ``fastpeft`` package of a source checkout and imports it as ``fastpeft_benchmarks``.
Modules here therefore import each other relatively (``from . import harness``).

- ``formulas``: FLOP and byte counts behind every TFLOP/s, GB/s and floor.
- ``harness``: timing, memory, floors, rows, the run loop.
- ``report``: the terminal table, JSON files, PNG plots, ``RESULTS.md``.
- ``baselines``: what users run today (dense torch, bitsandbytes, HF + bnb + PEFT, SDPA, HF generate).
- ``bindings``: our implementations, bound by name (a missing one is a row, not a crash).
- ``training_steps``, ``sampling_throughput``: the measuring functions for our whole-workload rows.
- ``scenarios``: one module per scenario.
"""
