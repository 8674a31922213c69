"""The key of a deployment's endpoint in the route table that the daemon publishes and gateways follow."""

from __future__ import annotations


def route_key(model: str, environment: str) -> str:
    return f"{model}/{environment}"
