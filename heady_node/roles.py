"""Node number -> role. Shared by the notebook and the operator CLI so both agree."""

from typing import Final

ROLES: Final = ("reasoning", "code", "vision", "batch")
NODE_COUNT: Final = 8


def role_for_node(node: int) -> str:
    """Nodes 1-2 reasoning, 3-4 code, 5-6 vision, 7-8 batch."""
    if not isinstance(node, int) or isinstance(node, bool) or not 1 <= node <= NODE_COUNT:
        raise ValueError(f"node must be an integer 1..{NODE_COUNT}, got {node!r}")
    return ROLES[(node - 1) // 2]


def nodes_for_role(role: str) -> tuple[int, int]:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    first = ROLES.index(role) * 2 + 1
    return (first, first + 1)
