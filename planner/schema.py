"""planner.plan.Plan -> JSON Schema (draft 2020-12) of the plan file, for ``gkdc plan --schema`` and tools.

The schema is generated from the pydantic models, so it cannot drift from what ``gkdc run`` accepts; it is
the validation-mode schema (what a plan file may contain), with the id and version stamped in.
"""

from __future__ import annotations

from typing import Any

from planner.plan import PLAN_SCHEMA_VERSION, Plan

SCHEMA_ID = f"urn:gkdc:plan:v{PLAN_SCHEMA_VERSION}"


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema of a plan file (a fresh dict each call; keys in pydantic's stable order)."""
    schema = Plan.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "description": f"gkdc plan file, plan_schema_version {PLAN_SCHEMA_VERSION}",
        **schema,
    }
