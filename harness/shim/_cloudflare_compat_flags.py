"""Test-harness stand-in for a runtime-internal module that the `workers` SDK imports.

The offline workerd (Pyodide 0.26.0a2) predates it; every compatibility flag the SDK asks
about reads as off, which matches the behaviour at the production compatibility date.
"""


def __getattr__(name: str) -> bool:
    return False
