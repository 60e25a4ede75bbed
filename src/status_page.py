"""The operator's status page (issue 11): one self-contained HTML page served by the Worker."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Page:
    status: int
    headers: dict[str, str]
    body: str | None


def serve(method: str, path: str, if_none_match: str | None) -> Page | None:
    """The page's answer for this request, or None when the path is not the page's."""
    return None
