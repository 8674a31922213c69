"""TokenBook: every gateway's token counts summed per deployment and window, saved across restarts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from modelfleet.reconciler.daemon.reconcile import gateway_settings
from modelfleet.reconciler.daemon.tokens import TokenBook
from modelfleet.reconciler.statedir import StoreError
from modelfleet.state.demand import TokensCounted
from modelfleet.state.loader import load_tree
from modelfleet.state.planning import PlanInputs, plan
from modelfleet.state.token_limits import TokenCounts, current
from tests.state.helpers import fixture_pool, tree

KEY = "m/production"
NOW = datetime(2026, 12, 3, 14, 30, 15, tzinfo=UTC).timestamp()


def counted(input: int, output: int = 0) -> dict[str, TokensCounted]:
    return {KEY: TokensCounted(input=input, output=output)}


class Clock:
    def __init__(self) -> None:
        self.now = NOW
        self.steady = 0.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.steady


def test_differences_of_cumulative_counts_are_summed_over_gateways() -> None:
    clock = Clock()
    book = TokenBook(clock=clock.wall, monotonic=clock.monotonic)
    book.record("gw-1", counted(10, 2))
    book.record("gw-2", counted(5))
    book.record("gw-1", counted(10, 2))  # nothing new
    book.record("gw-1", counted(13, 2))
    assert current(book.usage(KEY), "minute", NOW) == TokenCounts(18, 2)
    book.record("gw-2", counted(1))  # gw-2 restarted: its counters began again
    assert current(book.usage(KEY), "minute", NOW) == TokenCounts(19, 2)
    clock.now += 60  # the next minute, the same hour
    book.record("gw-1", counted(14, 2))
    assert current(book.usage(KEY), "minute", clock.now) == TokenCounts(1, 0)
    assert current(book.usage(KEY), "hour", clock.now) == TokenCounts(20, 2)
    reply = book.reply([KEY, "other/production"])
    assert reply[KEY]["minute"].input == 1 and reply[KEY]["hour"].input == 20 and reply[KEY]["day"].output == 2
    assert reply["other/production"]["minute"].input == 0


def test_counts_survive_a_restart_without_counting_a_gateway_twice() -> None:
    clock = Clock()
    saved: list[Any] = []
    book = TokenBook(save=saved.append, clock=clock.wall, monotonic=clock.monotonic)
    book.record("gw-1", counted(100))
    clock.steady += 5
    book.record("gw-1", counted(150))
    book.flush()
    restarted = TokenBook(load=lambda: saved[-1], clock=clock.wall, monotonic=clock.monotonic)
    assert current(restarted.usage(KEY), "minute", NOW) == TokenCounts(150, 0)
    restarted.record("gw-1", counted(160))  # the gateway kept counting while the daemon was away
    assert current(restarted.usage(KEY), "minute", NOW) == TokenCounts(160, 0)


def test_saves_are_spaced_and_a_failed_save_keeps_counting() -> None:
    clock = Clock()
    saved: list[Any] = []
    failing = [True]

    def save(data: Any) -> None:
        if failing[0]:
            raise StoreError("disk full", "modelfleet.db", disk_full=True)
        saved.append(data)

    book = TokenBook(save=save, clock=clock.wall, monotonic=clock.monotonic)
    clock.steady = 10
    book.record("gw-1", counted(1))  # the save fails: logged, counted in memory
    assert current(book.usage(KEY), "minute", NOW) == TokenCounts(1, 0)
    failing[0] = False
    book.record("gw-1", counted(2))  # within SAVE_EVERY of the failed one: not yet
    assert saved == []
    clock.steady = 20
    book.record("gw-1", counted(3))
    assert saved and saved[-1]["usage"][KEY]["minute"][1] == 3
    assert TokenBook(load=lambda: {"usage": "garbage"}).usage(KEY) == {}  # unreadable: starts empty


POLICIES = """\
apiVersion: modelfleet.dev/v1alpha1
kind: Policy
metadata: {name: small}
spec:
  type: maxToken
  maxTokens: {granularity: hour, input: 100}
"""
ENVIRONMENT = """\
apiVersion: modelfleet.dev/v1alpha1
kind: Environment
metadata: {name: production}
spec:
  policies: [small]
"""
MODEL = """\
apiVersion: modelfleet.dev/v1alpha1
kind: Model
metadata: {name: m}
spec:
  deployments:
    - environment: production
      runtime: {type: custom, image: example/echo:1, resources: {cpus: 0.5, memory: 256Mi}%s}
"""


def _plan_of(model: str) -> Any:
    catalog = load_tree(tree(**{"policies.yaml": POLICIES, "environments.yaml": ENVIRONMENT, "models/m.yaml": model}))
    return plan(PlanInputs(catalog=catalog, hosts=fixture_pool(), revision="rev-1"))


def test_token_limits_are_published_and_kept_while_a_manifest_is_invalid() -> None:
    good = gateway_settings(_plan_of(MODEL % ""))
    assert KEY in good.tokens and good.tokens[KEY].layers[0].budgets[0].input == 100
    bad = _plan_of(MODEL % ", bogus: 1")
    assert gateway_settings(bad).tokens == {}  # nothing known of it...
    assert gateway_settings(bad, good).tokens == good.tokens  # ...but bad input never lifts a limit
