"""The JSON Schema of the manifests, generated from the pydantic models of manifests.py.

Editors (yaml-language-server, JetBrains) validate and complete manifests with it. It is checked in at
``schema/modelfleet.schema.json`` (and ``examples-repo/schema/``); a test keeps both equal to
``render_manifest_schema()``. Draft-07, the newest draft yaml-language-server supports: definitions
live under ``definitions`` and pydantic's ``discriminator`` is an annotation validators ignore (the
``const`` of each kind already makes exactly one branch of the ``oneOf`` match).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from modelfleet.state.manifests import API_VERSION, Environment, Model, Policy

DIALECT = "http://json-schema.org/draft-07/schema#"
SCHEMA_PATH = "schema/modelfleet.schema.json"  # in the repository; editors reference it, keep it stable

ManifestDocument = Annotated[Environment | Policy | Model, Field(discriminator="kind")]


class _ManifestSchema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        # Titles derived from Python names ("Min Replicas") only add noise to editor hovers.
        return False


def manifest_schema() -> dict[str, Any]:
    """The schema of one manifest document: an Environment, a Policy or a Model, by its kind."""
    generated = TypeAdapter(ManifestDocument).json_schema(
        by_alias=True, ref_template="#/definitions/{model}", schema_generator=_ManifestSchema)
    definitions = generated.pop("$defs")
    return _draft07({
        "$schema": DIALECT,
        "title": "modelfleet manifest",
        "description": f"An Environment, Policy or Model manifest ({API_VERSION}).",
        **generated,
        "definitions": definitions,
    })


def _draft07(node: Any) -> Any:
    """Pydantic writes 2020-12 idioms that draft-07 reads differently: keywords beside a ``$ref`` are
    ignored there (so the ref moves into an ``allOf``), and docstrings keep their line breaks."""
    if isinstance(node, list):
        return [_draft07(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _draft07(value) for key, value in node.items()}
    if isinstance(out.get("description"), str):
        out["description"] = " ".join(out["description"].split())
    if "$ref" in out and len(out) > 1:
        out["allOf"] = [{"$ref": out.pop("$ref")}, *out.get("allOf", [])]
    return out


def render_manifest_schema() -> str:
    """The schema as the checked-in file holds it."""
    return json.dumps(manifest_schema(), indent=2, ensure_ascii=False) + "\n"
