"""The execution contract's pure rules: request ids kept, journal selection, the text line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfleet.state.executions import MAX_REQUEST_ID, Execution, ExecutionBatch, describe, select, valid_request_id


def execution(model: str = "m", environment: str = "production", **fields: object) -> Execution:
    base: dict[str, object] = {"time": 1_700_000_000.25, "request_id": "r1", "model": model,
                               "environment": environment, "status": 200, "duration_ms": 12.5}
    return Execution.model_validate({**base, **fields})


@pytest.mark.parametrize(("raw", "kept"), [
    (b"abc-123", "abc-123"),
    (b"x" * MAX_REQUEST_ID, "x" * MAX_REQUEST_ID),
    (b"x" * (MAX_REQUEST_ID + 1), None),
    (b"has space", None),
    (b"tab\there", None),
    ("é".encode(), None),
    (b"", None),
])
def test_a_client_request_id_is_kept_only_when_printable_and_short(raw: bytes, kept: str | None) -> None:
    assert valid_request_id(raw) == kept


def test_select_takes_the_newest_of_one_deployment_after_since_oldest_first() -> None:
    entries = [(i, execution("m" if i % 2 else "other", "production" if i < 8 else "staging", request_id=f"r{i}"))
               for i in range(1, 11)]
    assert [seq for seq, _ in select(entries, "m", "production", 0, 100)] == [1, 3, 5, 7]
    assert [seq for seq, _ in select(entries, "m", "production", 3, 2)] == [5, 7]
    assert [seq for seq, _ in select(entries, "m", None, 0, 100)] == [1, 3, 5, 7, 9]
    assert select(entries, "m", None, 0, 0) == []


def test_describe_says_where_which_version_and_how() -> None:
    line = describe(execution(host="h1", replica=2, spec_hash="a" * 64, revision="b" * 40, location="paris-1",
                              response_bytes=42, cold_start=True, retry=True).model_dump())
    assert line == ("m/production 200 12.5ms 42B h1/r2 aaaaaaaaaaaa@bbbbbbbbbbbb paris-1 id=r1 [cold,retry]")
    assert describe(execution(status=503).model_dump()) == "m/production 503 12.5ms 0B - - - id=r1"


def test_a_batch_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="status"):
        execution(status=42)
    with pytest.raises(ValidationError, match="extra"):
        ExecutionBatch.model_validate({"gateway": "g", "executions": [], "surprise": 1})
    with pytest.raises(ValidationError, match="request_id"):
        execution(request_id="")
