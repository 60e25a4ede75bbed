"""Gateway version, reported by /api/status and /healthz."""

VERSION = "0.1.0"
