"""``safety.maxDeletionPercent``: default 50, 0..100, errors with file:line."""

from __future__ import annotations

import pytest

from modelfleet.reconciler.config import ConfigError, parse_config


def test_the_default_is_50() -> None:
    assert parse_config("{}").safety.max_deletion_percent == 50


@pytest.mark.parametrize("value", [0, 12.5, 100])
def test_values_from_0_to_100(value: float) -> None:
    assert parse_config(f"safety: {{maxDeletionPercent: {value}}}").safety.max_deletion_percent == value


@pytest.mark.parametrize("value", [-1, 101, "lots"])
def test_out_of_range_is_an_error_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(f"repo: {{branch: main}}\nsafety:\n  maxDeletionPercent: {value}\n")
    text = str(error.value)
    assert "modelfleet.yaml:3" in text and "maxDeletionPercent" in text
