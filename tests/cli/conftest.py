"""What the `heady batch` and `heady finetune` CLI tests share: the gateway and key they talk
to, a fake clock, the environment each test runs in, and the gateway's error body."""

from pathlib import Path
from types import ModuleType

import pytest

from heady_cli import batch

GW = "https://gw.example.com"
KEY = "client-key-SECRET"
T0 = 1_800_000_000.0


class FakeClock:
    """One clock for sleep, wall time and monotonic time: sleeping advances it."""

    def __init__(self, start: float) -> None:
        self.t, self.sleeps = start, []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sleeper: ModuleType) -> FakeClock:
    """The gateway and key from the environment only, a fresh working folder, and the fake
    clock (at T0 + 20) behind `sleeper._sleep` and the CLI's wall and monotonic time."""
    for key in ["GATEWAY_API_KEY", "GATEWAY_API_KEYS", "HEADY_GATEWAY_URL"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HEADY_GATEWAY_URL", GW)
    monkeypatch.setenv("GATEWAY_API_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    clock = FakeClock(T0 + 20)
    monkeypatch.setattr(sleeper, "_sleep", clock.sleep)
    monkeypatch.setattr(batch, "_now", lambda: clock.t)
    monkeypatch.setattr(batch, "_monotonic", lambda: clock.t)
    return clock


def oai_error(message: str, code: str | None, rid: str | None) -> dict:
    err = {"message": message, "type": "invalid_request_error", "code": code, "request_id": rid}
    return {"error": err}
