"""`.dev.vars`: the local secrets file that `wrangler dev` reads, read the same way everywhere."""

from __future__ import annotations

import re

_QUOTED = re.compile(r"""^(["'])(.*)\1\s*(?:#.*)?$""")
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


class DevVarsError(ValueError):
    """A line that is not KEY=value (the message quotes only its start, never a value)."""


def parse_dev_vars(text: str) -> dict[str, str]:
    """KEY=value / KEY="value" / KEY='value' lines, # comments and blank lines, dotenv style as
    wrangler reads them: `\\n` expands in double quotes only; unquoted values lose a ` # comment`.
    """
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = _LINE.match(raw)
        if not m:
            raise DevVarsError(f".dev.vars line {n} is not KEY=value: {raw.strip()[:12]!r}...")
        key, value = m.group(1), m.group(2)
        quoted = _QUOTED.match(value)
        if quoted:  # a quoted value may be followed by a comment
            inner = quoted.group(2)
            value = inner.replace("\\n", "\n") if quoted.group(1) == '"' else inner
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        out[key] = value
    return out
