"""What a request needs a node to serve, decided by its path and (for chat) a byte search.

Pure. `/v1/images/*` needs image generation. A chat completion needs image input when one of
its messages has an `image_url` content part (OpenAI's ChatCompletionContentPartImageParam:
`{"type": "image_url", "image_url": {"url": ...}}`). Finding that must not cost a large request
much: a chat carrying a 5 MB base64 image would take Python's JSON parser tens of ms and a copy
of the whole body. Instead the body's bytes are searched for `"image_url"` in bounded windows
(`contains`): no JSON parsing, at most one window copied at a time, and the search usually ends
early because the key comes before the image data it introduces.

The byte pattern cannot be faked by text: inside a JSON string a quote is written `\\"`, so
`"image_url"` with its quotes appears only as a key or a bare string value. A request whose
tool schema happens to name an `image_url` property is taken as needing image input too: it
is only narrowed to nodes that have it (or whose capabilities are unknown).
"""

from __future__ import annotations

from collections.abc import Callable

from heady_shared.capabilities import CHAT, IMAGE_GENERATION, IMAGE_INPUT, LORA

IMAGE_PART = b'"image_url"'
WINDOW = 1 << 20  # bytes copied out of the JS buffer per step
IMAGES_PREFIX = "/v1/images/"
CHAT_PATH = "/v1/chat/completions"
LABELS = {
    CHAT: "chat",
    IMAGE_INPUT: "image input",
    IMAGE_GENERATION: "image generation",
    LORA: "LoRA adapters",
}


def path_need(method: str, rest: str) -> str | None:
    """The capability a request's path alone asks for, if any."""
    if method == "POST" and rest.startswith(IMAGES_PREFIX):
        return IMAGE_GENERATION
    return None


def scans_body(method: str, rest: str) -> bool:
    """Whether the body decides the need (chat completions may carry images)."""
    return method == "POST" and rest == CHAT_PATH


def contains(
    read: Callable[[int, int], bytes], total: int, needle: bytes, window: int = WINDOW
) -> bool:
    """Whether `needle` occurs in the `total` bytes that `read(start, end)` returns, reading
    windows of `window` bytes that overlap by len(needle) - 1 (so no match falls between)."""
    if not needle or total < len(needle):
        return False
    step = max(window, len(needle)) - (len(needle) - 1)
    start = 0
    while start < total:
        end = min(total, start + step + len(needle) - 1)
        if needle in read(start, end):
            return True
        if end == total:
            return False
        start += step
    return False


def needs(method: str, rest: str, body_has_image: Callable[[], bool]) -> str | None:
    """The capability this request needs; `body_has_image` is asked only for chat."""
    need = path_need(method, rest)
    if need is None and scans_body(method, rest) and body_has_image():
        return IMAGE_INPUT
    return need


def label(capability: str) -> str:
    return LABELS.get(capability, capability)
