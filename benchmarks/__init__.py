"""Benchmarks: scripts that measure what users care about and write their JSON/CSV into ``results/``.

Run them as modules from the repository root, e.g. ``python -m benchmarks.speed``. Each records the
machine it ran on (:func:`benchmarks.common.machine_info`).
"""
