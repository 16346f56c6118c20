"""The benchmarks of opsbay-mqtt: `python -m bench --help` (see docs/benchmarks.md).

Kept empty of imports on purpose: `python -m bench.baseline` and `bench.simworkers` start here.
"""
