"""The manifest's ``overflow`` (an on-prem endpoint the gateways send traffic to first): defaults and errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from modelfleet.state.loader import load_tree
from modelfleet.state.manifests import Deployment
from tests.state.helpers import custom_model, environment, tree


def deployment(overflow: dict[str, Any], **fields: Any) -> Deployment:
    data: dict[str, Any] = {"environment": "production", "runtime": {"type": "custom", "image": "x"},
                            "serverless": {"minReplicas": 0, "maxReplicas": 4}, "overflow": overflow, **fields}
    return Deployment.model_validate(data)


def test_defaults_and_camel_case_fields() -> None:
    spec = deployment({"endpoint": "http://10.0.0.5:8080/", "tokenFile": "/etc/modelfleet/onprem-token",
                       "healthCheck": {"path": "/ping", "period": "5s", "timeout": "2s", "failureThreshold": 3},
                       "maxConcurrency": 8, "percentage": 12.5}).overflow
    assert spec is not None
    assert spec.endpoint == "http://10.0.0.5:8080"  # the trailing slash goes: sub-paths are appended
    assert spec.token_file == "/etc/modelfleet/onprem-token"
    assert (spec.health_check.path, spec.health_check.period, spec.health_check.timeout,
            spec.health_check.failure_threshold) == ("/ping", 5.0, 2.0, 3)
    assert (spec.max_concurrency, spec.percentage) == (8, 12.5)
    minimal = deployment({"endpoint": "https://onprem.example/api"}).overflow
    assert minimal is not None
    assert (minimal.token_file, minimal.max_concurrency, minimal.percentage) == (None, None, 0.0)
    assert (minimal.health_check.path, minimal.health_check.period, minimal.health_check.failure_threshold) == (
        "/", 5.0, 2)
    assert (minimal.outlier_detection.consecutive_failures, minimal.outlier_detection.ejection_time) == (5, 30.0)


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "not-http": ({"endpoint": "ftp://10.0.0.5"}, "overflow.endpoint must be an http:// or https:// URL"),
    "no-host": ({"endpoint": "http://"}, "overflow.endpoint must be an http:// or https:// URL with a host"),
    "credentials": ({"endpoint": "http://u:p@h"}, "put a bearer token in overflow.tokenFile"),
    "bad-port": ({"endpoint": "http://h:99999"}, "has an invalid port"),
    "percentage-above-100": ({"endpoint": "http://h", "percentage": 101}, "less than or equal to 100"),
    "percentage-negative": ({"endpoint": "http://h", "percentage": -1}, "greater than or equal to 0"),
    "max-concurrency-0": ({"endpoint": "http://h", "maxConcurrency": 0}, "greater than or equal to 1"),
    "relative-health-path": ({"endpoint": "http://h", "healthCheck": {"path": "ping"}},
                             "overflow.healthCheck.path must start with '/'"),
    "period-0": ({"endpoint": "http://h", "healthCheck": {"period": "0s"}},
                 "overflow.healthCheck.period must be more than 0"),
    "ejection-0": ({"endpoint": "http://h", "outlierDetection": {"ejectionTime": 0}},
                   "overflow.outlierDetection.ejectionTime must be more than 0"),
    "no-endpoint": ({"percentage": 5}, "endpoint\n  Field required"),
    "unknown-field": ({"endpoint": "http://h", "maxConcurency": 3}, "Extra inputs are not permitted"),
}


@pytest.mark.parametrize("name", list(INVALID), ids=list(INVALID))
def test_invalid_overflow_fields_say_the_fix(name: str) -> None:
    fields, message = INVALID[name]
    with pytest.raises(ValidationError) as raised:
        deployment(fields)
    assert message in str(raised.value)


def test_overflow_needs_serverless() -> None:
    files = tree(**{"environments.yaml": environment("production"), "m.yaml": custom_model("m", """
        environment: production
        runtime: {type: custom, image: x}
        replicas: 2
        overflow: {endpoint: "http://10.0.0.5:8080"}""")})
    errors = [str(e) for e in load_tree(files).all_errors()]
    assert len(errors) == 1
    assert errors[0].startswith("m.yaml:")
    assert "overflow needs serverless" in errors[0] and "add serverless:" in errors[0]
