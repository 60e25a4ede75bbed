"""`.dev.vars`: the local secrets file that `wrangler dev` reads, read the same way everywhere."""

from __future__ import annotations

import re

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
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace("\\n", "\n") if value[0] == '"' else value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        out[key] = value
    return out
