"""Benchmarks: the gateway side by side with direct, bare JS and bare Python Workers.

`python -m bench.run` (or `python -m bench`); one module per section under `bench/sections/`.
See bench/README.md."""
