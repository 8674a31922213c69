"""``repo.fetchTimeout``: default 60 s, a duration above 0 (at most an hour), errors with file:line."""

from __future__ import annotations

import pytest

from modelfleet.reconciler.config import ConfigError, parse_config


def test_the_default_is_60_seconds() -> None:
    assert parse_config("{}").repo.fetch_timeout == 60.0


@pytest.mark.parametrize(("value", "seconds"), [("5s", 5.0), ("2m", 120.0), (15, 15.0)])
def test_durations_are_accepted(value: object, seconds: float) -> None:
    assert parse_config(f"repo: {{fetchTimeout: {value}}}").repo.fetch_timeout == seconds


@pytest.mark.parametrize("value", ["0s", "-1s", "2h", "soon"])
def test_zero_negative_huge_or_garbage_is_an_error_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(f"stateDir: /tmp/x\nrepo:\n  fetchTimeout: {value}\n")
    text = str(error.value)
    assert "modelfleet.yaml:3" in text and "fetchTimeout" in text, text
