"""Python handlers for the demo: one that works, one that always fails (to fill the dead letters).

Load them in the serving process with ``--import demo_handlers`` (this folder on PYTHONPATH).
"""

from __future__ import annotations

from typing import Any

import graphiti_mpq


@graphiti_mpq.handler("summarise")
def summarise(payload: dict[str, Any]) -> dict[str, Any]:
    text = str(payload.get("text", ""))
    return {"words": len(text.split())}


@graphiti_mpq.handler("flaky-llm-call")
def flaky_llm_call(payload: dict[str, Any]) -> None:
    raise ConnectionError(f"LLM endpoint {payload.get('endpoint', '?')} refused the connection")
