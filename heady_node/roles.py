"""Node number <-> role for the node side, from the one route table in heady_shared.routes."""

from typing import Final

from heady_shared.routes import DEFAULT_POOLS, NODE_COUNT, role_of

ROLES: Final = tuple(DEFAULT_POOLS)


def role_for_node(node: int) -> str:
    """The role of a node's own pair (nodes 1-2 reasoning, 3-4 code, 5-6 vision, 7-8 batch)."""
    if not isinstance(node, int) or isinstance(node, bool) or not 1 <= node <= NODE_COUNT:
        raise ValueError(f"node must be an integer 1..{NODE_COUNT}, got {node!r}")
    role = role_of(node)
    if role is None:  # unreachable with the default table, which pairs every node
        raise ValueError(f"node {node} is in no role's pair")
    return role
