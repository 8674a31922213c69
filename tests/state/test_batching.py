"""runtime.batchSize / runtime.maxBatchDelay: validated where they are written, resolved for the torch
runtime only, and part of the spec hash only when set (existing deployments keep their hash)."""

from __future__ import annotations

import pytest

from modelfleet.state.desired import DeploymentState
from tests.state.helpers import custom_model, desired_of, environment, fixture_pool, tree

SHA = "sha256:" + "a" * 64
TORCH = f"environment: production\norigin: {{file: {{sha256: '{SHA}'}}}}\nruntime: {{type: torch{{extra}}}}"


def _deployment(text: str) -> tuple[list[str], DeploymentState]:
    files = tree(**{"env.yaml": environment("production"), "m.yaml": custom_model("m", text)})
    catalog, desired = desired_of(files, fixture_pool())
    return [str(e) for e in catalog.all_errors()], desired.deployments[("m", "production")]


def _torch(extra: str = "") -> str:
    return TORCH.replace("{extra}", extra)


def test_the_settings_reach_the_resolved_runtime_in_milliseconds() -> None:
    errors, state = _deployment(_torch(", batchSize: 8, maxBatchDelay: 5ms"))
    assert errors == [] and state.runtime is not None
    assert (state.runtime.batch_size, state.runtime.max_batch_delay_ms) == (8, 5)
    _, seconds = _deployment(_torch(", maxBatchDelay: 0.25"))  # a plain number is seconds, as every duration
    assert seconds.runtime is not None and seconds.runtime.max_batch_delay_ms == 250
    _, unset = _deployment(_torch())
    assert unset.runtime is not None and (unset.runtime.batch_size, unset.runtime.max_batch_delay_ms) == (None, None)


def test_a_typeless_runtime_of_an_archive_is_torch_and_takes_them() -> None:
    text = f"environment: production\norigin: {{file: {{sha256: '{SHA}'}}}}\nruntime: {{batchSize: 4}}"
    errors, state = _deployment(text)
    assert errors == [] and state.runtime is not None
    assert (state.runtime.type, state.runtime.batch_size) == ("torch", 4)


def test_the_spec_hash_changes_only_when_they_are_set() -> None:
    hashes = {extra: _deployment(_torch(extra))[1].spec_hash
              for extra in ("", ", batchSize: 1", ", batchSize: 8", ", batchSize: 8, maxBatchDelay: 5ms",
                            ", batchSize: 8, maxBatchDelay: 10ms", ", maxBatchDelay: 100ms")}
    # Every value is a different container (a rollout); even the defaults written out are a change
    # (the container is told them), but leaving them out keeps the hash of before.
    assert len(set(hashes.values())) == len(hashes)
    assert _deployment(_torch(", batchSize: 8, maxBatchDelay: 5ms"))[1].spec_hash == hashes[
        ", batchSize: 8, maxBatchDelay: 5ms"]


@pytest.mark.parametrize(("extra", "message"), [
    (", batchSize: 0", "spec.deployments[0].runtime.batchSize: "),
    (", batchSize: 1025", "spec.deployments[0].runtime.batchSize: "),
    (", batchSize: eight", "spec.deployments[0].runtime.batchSize: "),
    (", maxBatchDelay: 11s", "spec.deployments[0].runtime.maxBatchDelay: maxBatchDelay 11s is more than 10s; "
                             "use 0-10s (e.g. 5ms)"),
    (", maxBatchDelay: 0.5ms", "spec.deployments[0].runtime.maxBatchDelay: maxBatchDelay 0.5ms is not a whole "
                               "number of milliseconds"),
    (", maxBatchDelay: soon", "spec.deployments[0].runtime.maxBatchDelay: 'soon' is not a duration"),
    (", maxBatchDelay: -5", "spec.deployments[0].runtime.maxBatchDelay: "),
])
def test_out_of_range_values_are_located_errors(extra: str, message: str) -> None:
    errors, state = _deployment(_torch(extra))
    assert len(errors) == 1 and errors[0].startswith("m.yaml:"), errors
    assert message in errors[0], errors
    assert state.frozen and state.runtime is None


def test_the_bounds_themselves_are_accepted() -> None:
    for extra in (", batchSize: 1, maxBatchDelay: 0", ", batchSize: 1024, maxBatchDelay: 10s"):
        errors, state = _deployment(_torch(extra))
        assert errors == [] and state.runtime is not None, (extra, errors)


def test_other_runtimes_refuse_them_naming_the_field() -> None:
    text = ("environment: production\norigin: {huggingface: {model: org/m, revision: main}}\n"
            "runtime: {type: transformers, batchSize: 8}")
    errors, _ = _deployment(text)
    assert len(errors) == 1 and "spec.deployments[0].runtime: runtime.batchSize and runtime.maxBatchDelay are " \
                                "settings of the torch runtime, not of runtime.type transformers" in errors[0], errors
    typeless = ("environment: production\norigin: {huggingface: {model: org/m, revision: main}}\n"
                "runtime: {maxBatchDelay: 5ms}")
    errors, _ = _deployment(typeless)
    assert len(errors) == 1 and "serves model archives (origin.file)" in errors[0], errors
