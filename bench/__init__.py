"""The benchmark suite of opsbay-mqtt: `python -m bench` (see docs/benchmarks.md).

Kept empty of imports on purpose: `python -m bench.simworkers` starts with this module.
"""
