"""Benchmarks: the gateway side by side with direct, bare JS and bare Python (issue 4)."""
