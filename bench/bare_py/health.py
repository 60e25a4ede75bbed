"""Stand-in so the harness adapter (which imports `health` for its reset route) loads the
bare Worker; the bare pass-through keeps no health state."""

KV_KEY = "bench-bare-unused"


class HealthView:
    pass
