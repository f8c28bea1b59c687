"""Benchmarks: latency/throughput of the bridge vs text relay vs direct (``latency.py``) and
bridge-training throughput with and without the sender-feature cache (``train_throughput.py``).
See benchmarks/README.md."""
