"""The notebook's periodic status line, from the metrics heady_shared.metrics parses."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    served: int | None  # finished requests since start
    running: int | None
    waiting: int | None  # queue depth
    images_running: int | None = None  # the image engine beside vLLM (vision nodes)
    images_waiting: int | None = None


def snapshot(metrics: dict[str, float]) -> Snapshot:
    def pick(*names: str) -> int | None:
        for n in names:
            if n in metrics:
                return int(metrics[n])
        return None

    return Snapshot(
        served=pick("vllm:request_success_total", "vllm:e2e_request_latency_seconds_count"),
        running=pick("vllm:num_requests_running"),
        waiting=pick("vllm:num_requests_waiting"),
        images_running=pick("heady_images:num_requests_running"),
        images_waiting=pick("heady_images:num_requests_waiting"),
    )


def _n(v: int | None) -> str:
    return "?" if v is None else str(v)


def status_line(clock: str, node: int, role: str, snap: Snapshot | None, error: str = "") -> str:
    head = f"[{clock}] node {node} ({role})"
    if snap is None:
        return f"{head} DOWN: {error or 'no answer from the engine'}"
    line = (
        f"{head} up | served {_n(snap.served)} | running {_n(snap.running)} "
        f"| queue {_n(snap.waiting)}"
    )
    if snap.images_running is not None or snap.images_waiting is not None:
        line += f" | images running {_n(snap.images_running)} queue {_n(snap.images_waiting)}"
    return line
