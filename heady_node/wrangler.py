"""What the operator pastes on their own machine once a node is live."""

import shlex

from heady_node.roles import role_for_node
from heady_shared.routes import endpoint_key


def secret_name(node: int) -> str:
    role_for_node(node)  # validates 1..8
    return endpoint_key(node)


def paste_block(node: int, url: str, role: str | None = None) -> list[str]:
    name = secret_name(node)
    return [
        f"Node {node} ({role or role_for_node(node)}) is live at {url}",
        "",
        "On your machine, in the gateway repo, run:",
        f"  npx wrangler secret put {name}",
        f"and paste this value when asked: {url}",
        "or, non-interactively:",
        f"  echo {shlex.quote(url)} | npx wrangler secret put {name}",
        "",
        "For local `npx wrangler dev`, add this line to .dev.vars:",
        f'  {name}="{url}"',
    ]
