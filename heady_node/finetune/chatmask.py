"""Which characters and tokens of a chat-templated example are trained on (pure, stdlib only).

The example is rendered with the tokenizer's own chat template (the same text vLLM builds when
it serves the adapter). An assistant turn i with weight 1 is trained on from the end of the
prompt that asks for it (messages[:i] rendered with the generation prompt) to the end of
messages[:i+1] rendered: its content plus the template's end-of-turn marker, so the adapter also
learns to stop. Everything else (system, user, tool turns, weight-0 assistant turns, template
markup) gets label -100 and costs no loss.

Templates that render a prefix differently once more messages follow (e.g. ones that inject a
default system prompt only when none is given are fine; ones that rewrite earlier turns are not)
are detected: the spans must be prefixes of the full text, else the example is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

IGNORE = -100

# (messages, add_generation_prompt) -> rendered text
Render = Callable[[Sequence[Mapping[str, object]], bool], str]


class TemplateError(ValueError):
    pass


def normalise(messages: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Messages as templates expect them: text parts joined into a string, `weight` dropped."""
    out = []
    for msg in messages:
        m = {k: v for k, v in msg.items() if k != "weight"}
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        out.append(m)
    return out


def assistant_spans(
    render: Render, messages: Sequence[Mapping[str, object]]
) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character spans to train on])."""
    clean = normalise(messages)
    full = render(clean, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant" or msg.get("weight", 1) != 1:
            continue
        prompt = render(clean[:i], True) if i else ""
        upto = render(clean[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise TemplateError(
                f"the chat template renders messages[{i}] differently once later messages "
                "follow; cannot tell which tokens belong to the assistant"
            )
        if len(upto) > len(prompt):
            spans.append((len(prompt), len(upto)))
    return full, spans


def labels_for(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Labels for causal-LM loss: the token id where the token starts inside a trained span,
    IGNORE elsewhere (special tokens with empty offsets included)."""
    labels = []
    for tok, (start, end) in zip(input_ids, offsets, strict=True):
        inside = end > start and any(a <= start < b for a, b in spans)
        labels.append(tok if inside else IGNORE)
    return labels
