"""Names a framework gives (a node, a crew role, an SDK agent) as budget agent names."""

from __future__ import annotations

import re


def agent_name(value: str) -> str:
    """`value` as a budget agent name: characters outside ``[A-Za-z0-9_.@-]`` become '-', 64 at most."""
    cleaned = re.sub(r"[^A-Za-z0-9_.@-]", "-", value).strip("-.@_")[:64]
    return cleaned or "agent"
