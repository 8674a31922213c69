"""Plans of review branches (``review.branches``) and of the forge's open pull requests against
``repo.branch`` (``review.pullRequests`` with a forge ``status.provider``): after a pass, each head
of a matching branch or pull request that was not planned yet is planned — with the pass's plan
function and inputs, only the catalog is the branch's — and never applied. Its ``modelfleet/plan``
commit status says what it would do (state/review.py decides what), and the plan is kept for the
plan page (api/plans.py).

It runs on a thread of its own, woken after each pass and by the forge's pull request webhooks
(``wake``): a slow or failing review plan never delays nor fails a pass; its failure is that
review's ``failure`` status. A pull request also gets one comment with the plan (state/pulls.py
writes it), edited in place on each push, written through an outbox of its own (status/outbox.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from modelfleet.reconciler.config import local_url
from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.reconciler.status import CommitStatus, StatusError, StatusWriter
from modelfleet.state.loader import load_tree
from modelfleet.state.planning import Plan, PlanInputs, plan
from modelfleet.state.pulls import PullRequest, comment_markdown, select_pulls
from modelfleet.state.review import PLAN_CONTEXT, failed_document, review_document

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon
    from modelfleet.reconciler.status.pulls import ForgePulls

log = logging.getLogger("modelfleet.review")
KEEP_PLANS = 50  # review plans kept in memory for the plan page
KEEP_PLANNED = 2000  # heads remembered as planned (not planned again)
LISTED_PULLS = 100  # open pull requests looked at per round (the forge's first page)
SKIPPED_TRIGGERS = frozenset({"demand", "scale"})  # autoscaler passes: no review round


@dataclass(frozen=True)
class _Base:
    """What the last pass planned from, and its plan: the base every review is compared with."""

    inputs: PlanInputs
    plan: Plan


class ReviewPlanner:
    def __init__(self, daemon: Daemon, keep: int = KEEP_PLANS) -> None:
        self.daemon = daemon
        self.settings = daemon.config.review
        self.keep = keep
        self._base: _Base | None = None
        self._plans: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._planned: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy: threading.Thread | None = None  # a plan that outlived review.timeout
        self._fetch_error: str | None = None
        # Pull requests (use_forge): the forge's API, the outbox the comments go through, and the
        # (number, head) pairs planned and commented already.
        self.pulls: ForgePulls | None = None
        self.comments: StatusWriter | None = None
        self._pull_heads: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._pulls_error: str | None = None
        # False: rounds only run when run_once is called (tests, `run --once`).
        self.background = True

    @property
    def enabled(self) -> bool:
        return bool(self.settings.branches) or self.pulls is not None

    def use_forge(self, pulls: ForgePulls, comments: StatusWriter | None = None) -> None:
        """Plan the open pull requests of ``pulls``; comments go to ``comments`` (default: an
        outbox around a CommentWriter, unless ``review.comment`` is off)."""
        from modelfleet.reconciler.status.outbox import StatusOutbox
        from modelfleet.reconciler.status.pulls import CommentWriter

        self.pulls = pulls
        if comments is None and self.settings.comment:
            comments = StatusOutbox(CommentWriter(pulls))
        self.comments = comments
        self.daemon.status.pull_requests = self.pulls_json

    def pulls_json(self) -> dict[str, Any]:
        """``/api/v1/status`` ``pullRequests``: the forge and repository, the pull requests planned
        (number -> last head), the last listing or fetch error (null while there is none), and the
        comment queue (``pending``, ``lastError``, ``retryingSince``, ``nextAttemptIn``)."""
        assert self.pulls is not None
        with self._lock:  # (the review thread adds to it meanwhile)
            pairs = list(self._pull_heads)
        planned = {str(number): head for number, head in pairs}  # in order: the last head of each wins
        to_json = getattr(self.comments, "to_json", None)
        return {"forge": self.pulls.forge, "repository": self.pulls.target, "planned": planned,
                "lastError": self._pulls_error, "comments": to_json() if callable(to_json) else None}

    def plan_url(self, revision: str) -> str:
        api = self.daemon.config.api
        return f"{(api.public_url or local_url(api.listen)).rstrip('/')}/plans/{revision}"

    # --- called by the pass -----------------------------------------------------------------------

    def pass_planned(self, inputs: PlanInputs, pass_plan: Plan) -> None:
        """The pass planned: its inputs and plan are the base of the next review round."""
        self._base = _Base(inputs, pass_plan)

    def after_pass(self, trigger: str = "manual") -> None:
        """Wake the review thread (started on first use); returns at once."""
        if (not self.enabled or not self.background or self._base is None or trigger in SKIPPED_TRIGGERS
                or self._stop.is_set()):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="modelfleet-review", daemon=True)
            self._thread.start()
        self._wake.set()

    def wake(self, reason: str = "webhook") -> bool:
        """A pull request was opened or pushed to (its webhook): a review round at once, no pass.
        False when there is nothing to plan against yet (the first pass wakes the round anyway)."""
        if not self.enabled or self._base is None or self._stop.is_set():
            return False
        log.debug("review round woken (%s)", reason)
        if not self.background:
            return True
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="modelfleet-review", daemon=True)
            self._thread.start()
        self._wake.set()
        return True

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        closer = getattr(self.comments, "close", None)
        if callable(closer):
            closer()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set() or self.daemon.stop_event.is_set():
                return
            try:
                self.run_once()
            except Exception:  # never let a review end the thread
                log.exception("review round crashed; the next pass tries again")

    # --- a round ----------------------------------------------------------------------------------

    def run_once(self) -> list[str]:
        """Fetch the review branches and the open pull requests, plan the new heads (newest first,
        at most review.maxPlans in all); returns the heads planned."""
        base = self._base
        if not self.enabled or base is None:
            return []
        done = self._branch_round(base) if self.settings.branches else []
        if self.pulls is not None:
            done += self._pull_round(base, self.settings.max_plans - len(done))
        return done

    def _branch_round(self, base: _Base) -> list[str]:
        try:
            heads = self.daemon.source.fetch_review(list(self.settings.branches), max(5.0, self.settings.timeout))
        except ModelfleetError as exc:
            if str(exc) != self._fetch_error:
                log.warning("%s", exc)
            self._fetch_error = str(exc)
            return []
        self._fetch_error = None
        done: list[str] = []
        for branch, head in heads:
            if len(done) >= self.settings.max_plans:
                break
            if head in self._planned or head == base.inputs.revision:
                continue
            if self._busy is not None and self._busy.is_alive():
                log.warning("a review plan is still running past review.timeout: the next round goes on")
                break
            self._remember(head)
            self.plan_head(branch, head, base)
            done.append(head)
        return done

    def _pull_round(self, base: _Base, budget: int) -> list[str]:
        """The open pull requests against repo.branch, newest first: each new head is fetched from
        the remote (the forge's pull ref), planned (at most ``budget``), and commented on."""
        assert self.pulls is not None
        tracked = self.daemon.config.repo.branch
        try:
            listed = select_pulls(self.pulls.open_pulls(tracked), tracked, LISTED_PULLS, self.settings.forks)
        except StatusError as exc:
            self._pull_problem(f"listing the open pull requests failed: {exc}")
            return []
        # The forge's head of each: already planned ones need no fetch.
        wanted = [p for p in listed if (p.number, p.head_sha) not in self._pull_heads][:max(0, budget)]
        if not wanted:
            self._pulls_error = None
            return []
        try:
            heads = self.daemon.source.fetch_pulls({p.number: self.pulls.pull_ref(p.number) for p in wanted},
                                                   max(5.0, self.settings.timeout))
        except ModelfleetError as exc:
            self._pull_problem(str(exc))
            return []
        self._pulls_error = None
        done: list[str] = []
        for pull in wanted:
            head = heads.get(pull.number)
            if head is None:
                log.info("pull request #%d: %s is not on the remote (yet): planned when it is", pull.number,
                         self.pulls.pull_ref(pull.number))
                continue
            if (pull.number, head) in self._pull_heads:
                continue
            if self._busy is not None and self._busy.is_alive():
                log.warning("a review plan is still running past review.timeout: the next round goes on")
                break
            self._remember_pull(pull.number, head)
            with self._lock:
                known = self._plans.get(head)
            if known is not None:  # planned already (as a review branch, or for another pull request)
                document = {**known, "pullRequest": pull.to_json()}
            else:
                self._remember(head)
                document = self.plan_head(pull.head_branch or f"pull/{pull.number}", head, base, pull)
                done.append(head)
            self._comment(pull, head, document)
        return done

    def _pull_problem(self, message: str) -> None:
        if message != self._pulls_error:
            log.warning("%s", message)
        self._pulls_error = message

    def _remember_pull(self, number: int, head: str) -> None:
        # (Only the head fetched: when the forge's listing is ahead of its pull ref, the next round
        # fetches again and plans the newer head.)
        with self._lock:
            self._pull_heads[(number, head)] = None
            while len(self._pull_heads) > KEEP_PLANNED:
                self._pull_heads.popitem(last=False)

    def _comment(self, pull: PullRequest, head: str, document: dict[str, Any]) -> None:
        if self.comments is None:
            return
        from modelfleet.reconciler.status.pulls import COMMENT_CONTEXT, comment_key

        body = comment_markdown(document, self.plan_url(head), self.daemon.config.repo.branch)
        try:
            self.comments.publish(comment_key(pull.number), [CommitStatus(COMMENT_CONTEXT, document["state"], body)])
        except StatusError as exc:
            log.warning("commenting on pull request #%d failed: %s", pull.number, exc)

    def plan_head(self, branch: str, head: str, base: _Base, pull: PullRequest | None = None) -> dict[str, Any]:
        """Plan one head within review.timeout, publish its status, keep its document."""
        self._publish(head, "pending", f"planning {branch} against {base.inputs.revision[:12]}")
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["document"] = self._plan(branch, head, base)
            except ModelfleetError as exc:
                result["error"] = str(exc)
            except Exception as exc:
                log.exception("planning %s at %s crashed", branch, head[:12])
                result["error"] = f"internal error while planning ({type(exc).__name__}: {exc})"

        worker = threading.Thread(target=work, name=f"modelfleet-review-{head[:8]}", daemon=True)
        worker.start()
        worker.join(self.settings.timeout)
        if worker.is_alive():
            self._busy = worker
            result = {"error": f"planning took longer than review.timeout ({self.settings.timeout:g}s); "
                               "push again to retry"}
        document: dict[str, Any] = result.get("document") or failed_document(branch, head, base.inputs.revision,
                                                             str(result.get("error")), time.time())
        if pull is not None:
            document = {**document, "pullRequest": pull.to_json()}
        with self._lock:
            self._plans[head] = document
            self._plans.move_to_end(head)
            while len(self._plans) > self.keep:
                self._plans.popitem(last=False)
        self._publish(head, document["state"], str(document["description"]))
        log.info("review %s at %s: %s: %s", branch, head[:12], document["state"], document["description"])
        return document

    def _plan(self, branch: str, head: str, base: _Base) -> dict[str, Any]:
        """The branch's catalog with the pass's inputs (observation, store facts, clock, load);
        probes are not made again. Nothing of the branch is stored or applied."""
        tree = self.daemon.source.tree(head)
        catalog = load_tree(tree)
        facts = self.daemon.origins.facts(catalog)  # no repository files ingested from a review branch
        inputs = replace(base.inputs, catalog=catalog, revision=head, origin_facts=facts)
        result = plan(inputs)
        return review_document(branch, head, base.inputs.revision, base.plan.desired, base.plan.catalog, catalog,
                               result.to_json(explain=True), result.desired, result.actions, time.time())

    def _remember(self, head: str) -> None:
        self._planned[head] = None
        while len(self._planned) > KEEP_PLANNED:
            self._planned.popitem(last=False)

    def _publish(self, head: str, state: Any, description: str) -> None:
        writer = self.daemon.status_writer
        if writer is None:
            return
        try:
            writer.publish(head, [CommitStatus(PLAN_CONTEXT, state, description, self.plan_url(head))])
        except StatusError as exc:
            log.warning("publishing the plan status of %s failed: %s", head[:12], exc)

    # --- read by the API --------------------------------------------------------------------------

    def get(self, revision: str) -> dict[str, Any] | None:
        """The review plan of a head (a full sha or a prefix of at least 7), with ``stale``: the
        base branch moved since it was planned."""
        revision = revision.lower()
        with self._lock:
            found = self._plans.get(revision)
            if found is None and len(revision) >= 7:
                matches = [doc for sha, doc in self._plans.items() if sha.startswith(revision)]
                found = matches[0] if len(matches) == 1 else None
            if found is None:
                return None
            document = dict(found)
        current = self.daemon.status.revision
        document["currentBase"] = current
        document["stale"] = current is not None and current != document["base"]
        return document

    def summaries(self) -> list[dict[str, Any]]:
        with self._lock:
            documents = list(self._plans.values())
        return [{**{k: d[k] for k in ("branch", "revision", "base", "plannedAt", "state", "description")},
                 **({"pullRequest": d["pullRequest"]} if "pullRequest" in d else {})}
                for d in reversed(documents)]
