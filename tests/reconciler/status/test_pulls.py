"""status/pulls.py against the stand-in forge (GitHub, Gitea, GitLab shapes): listing open pull
requests, the one plan comment edited in place, opening a pull request, and the outbox around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.reconciler.config import StatusSettings
from modelfleet.reconciler.status import CommitStatus, StatusError
from modelfleet.reconciler.status.outbox import StatusOutbox
from modelfleet.reconciler.status.pulls import (
    COMMENT_CONTEXT,
    CommentWriter,
    ForgePulls,
    GiteaPulls,
    GitHubPulls,
    GitLabPulls,
    comment_key,
    pulls_from_settings,
)
from modelfleet.state.pulls import COMMENT_MARKER

from .forge_standin import StandInForge

TOKEN = "tok-pulls-1a2b3c4d5e"
TARGETS = {"gitea": "acme/models", "github": "acme/models", "gitlab": "platform/ml/models"}
SHA1, SHA2, SHA3 = "1" * 40, "2" * 40, "3" * 40


def client_for(forge: StandInForge, token: str = TOKEN) -> ForgePulls:
    if forge.forge == "gitea":
        return GiteaPulls(forge.url, forge.target, token, timeout=2)
    if forge.forge == "github":
        return GitHubPulls(forge.url, forge.target, token, timeout=2)
    return GitLabPulls(forge.url, forge.target, token, timeout=2)


@pytest.fixture(params=["gitea", "github", "gitlab"])
def forge(request: pytest.FixtureRequest) -> Iterator[StandInForge]:
    with StandInForge(request.param, TOKEN, TARGETS[request.param]) as standin:
        yield standin


def plan_comment(text: str) -> str:
    return f"{COMMENT_MARKER}\n### modelfleet plan\n\n{text}\n"


def test_open_pull_requests_against_the_branch_newest_first(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    forge.add_pull(2, "feature/b", SHA2, base="release")
    forge.add_pull(3, "feature/c", SHA3)
    forge.move_pull(1, SHA2)  # pushed to last: the most recently updated
    pulls = client_for(forge).open_pulls("main")
    assert [(p.number, p.head_branch, p.head_sha, p.base) for p in pulls] == [
        (1, "feature/a", SHA2, "main"), (3, "feature/c", SHA3, "main")]
    assert pulls[0].url.endswith("/merge_requests/1" if forge.forge == "gitlab" else "/pull/1")
    assert pulls[0].updated_at.startswith("2026-12-01T")
    assert forge.violations == []
    (listing,) = forge.requests
    assert listing.method == "GET"
    assert "state=opened" in listing.path if forge.forge == "gitlab" else "state=open" in listing.path


def test_pull_requests_from_forks_are_marked(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    forge.add_pull(2, "patch-1", SHA2, fork="someone/models")
    marks = {p.number: p.from_fork for p in client_for(forge).open_pulls("main")}
    assert marks == {1: False, 2: True}


def test_the_pull_ref_of_each_forge(forge: StandInForge) -> None:
    expected = "refs/merge-requests/4/head" if forge.forge == "gitlab" else "refs/pull/4/head"
    assert client_for(forge).pull_ref(4) == expected


def test_one_comment_created_then_edited_in_place(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    other = forge.add_comment(1, "please look at the replicas")
    pulls = client_for(forge)
    first = pulls.upsert_comment(1, plan_comment("2 to create"))
    second = pulls.upsert_comment(1, plan_comment("3 to create"))
    assert first == second
    comments = forge.comments_on(1)
    assert [c["id"] for c in comments] == [other, first]
    assert comments[0]["body"] == "please look at the replicas"  # someone else's comment: untouched
    assert comments[1]["body"] == plan_comment("3 to create")
    methods = [r.method for r in forge.requests]
    assert methods == ["GET", "POST", "PUT" if forge.forge == "gitlab" else "PATCH"]
    assert forge.violations == []


def test_a_restarted_daemon_finds_its_comment_by_the_marker(forge: StandInForge) -> None:
    forge.add_pull(5, "feature/a", SHA1)
    forge.add_comment(5, f"> {COMMENT_MARKER}\n> quoted by a reviewer")
    ours = forge.add_comment(5, plan_comment("old plan"), author="modelfleet")
    assert client_for(forge).upsert_comment(5, plan_comment("new plan")) == ours  # a new client: no cache
    assert [c["body"] for c in forge.comments_on(5)][1] == plan_comment("new plan")
    assert len(forge.comments_on(5)) == 2
    assert "POST" not in [r.method for r in forge.requests]
    assert forge.violations == []


def test_our_comment_is_found_past_the_first_page(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    for i in range(120):
        forge.add_comment(1, f"comment {i}")
    ours = forge.add_comment(1, plan_comment("old plan"))
    assert client_for(forge).upsert_comment(1, plan_comment("new plan")) == ours
    assert len(forge.comments_on(1)) == 121
    assert forge.violations == []


def test_a_comment_deleted_meanwhile_is_created_again(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    pulls = client_for(forge)
    pulls.upsert_comment(1, plan_comment("first"))
    forge.comments[1].clear()  # someone deleted it
    created = pulls.upsert_comment(1, plan_comment("second"))
    assert [(c["id"], c["body"]) for c in forge.comments_on(1)] == [(created, plan_comment("second"))]


def test_unauthorized_is_final_and_hides_the_token(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    with pytest.raises(StatusError) as caught:
        client_for(forge, token="wrong-" + TOKEN).open_pulls("main")
    assert caught.value.transient is False
    assert "401" in str(caught.value) and TOKEN not in str(caught.value)
    assert TOKEN not in repr(client_for(forge))


def test_server_errors_are_transient(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    forge.script = [(503, {"message": "maintenance"})]
    with pytest.raises(StatusError) as caught:
        client_for(forge).open_pulls("main")
    assert caught.value.transient is True and "503" in str(caught.value)


def test_open_a_pull_request_or_find_the_open_one(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    pulls = client_for(forge)
    assert pulls.find_open_pull("release/echo-production-1234", "main") is None
    created = pulls.create_pull("release/echo-production-1234", "main", "release echo", "body")
    assert created.number == 2 and created.head_branch == "release/echo-production-1234" and created.url
    found = pulls.find_open_pull("release/echo-production-1234", "main")
    assert found is not None and found.number == 2
    with pytest.raises(StatusError) as caught:  # the forge refuses a second one for the same branch
        pulls.create_pull("release/echo-production-1234", "main", "release echo", "body")
    assert caught.value.transient is False
    assert forge.violations == []


def test_comments_through_the_outbox_latest_wins_and_retried(forge: StandInForge) -> None:
    forge.add_pull(1, "feature/a", SHA1)
    outbox = StatusOutbox(CommentWriter(client_for(forge)), base_delay=0.05, max_delay=0.1)
    forge.script = [(503, {"message": "down"})] * 2  # the first two answers fail: retried
    try:
        outbox.publish(comment_key(1), [CommitStatus(COMMENT_CONTEXT, "success", plan_comment("head 1"))])
        outbox.publish(comment_key(1), [CommitStatus(COMMENT_CONTEXT, "success", plan_comment("head 2"))])
        assert outbox.flush(10)
    finally:
        outbox.close()
    assert [c["body"] for c in forge.comments_on(1)] == [plan_comment("head 2")]
    assert forge.violations == []


def test_comment_writer_refuses_keys_that_are_not_pull_requests(forge: StandInForge) -> None:
    with pytest.raises(StatusError):
        CommentWriter(client_for(forge)).publish(SHA1, [CommitStatus(COMMENT_CONTEXT, "success", "x")])


@pytest.mark.parametrize(("provider", "repo_url", "expected"), [
    ("github", "https://github.com/acme/models.git", (GitHubPulls, "https://api.github.com", "acme/models")),
    ("gitea", "git@git.example.com:acme/models.git", (GiteaPulls, "https://git.example.com", "acme/models")),
    ("gitlab", "https://gitlab.example.com/platform/ml/models",
     (GitLabPulls, "https://gitlab.example.com", "platform/ml/models")),
])
def test_pulls_from_settings(tmp_path: Path, provider: str, repo_url: str,
                             expected: tuple[type, str, str]) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    pulls = pulls_from_settings(StatusSettings(provider=provider, token_file=str(token)), repo_url)
    kind, base_url, target = expected
    assert pulls is not None and isinstance(pulls, kind)
    assert pulls.base_url == base_url and pulls.target == target


def test_no_pulls_without_a_forge() -> None:
    assert pulls_from_settings(StatusSettings(provider="git-notes"), "/srv/git/models.git") is None
    assert pulls_from_settings(StatusSettings(provider="none"), None) is None


class UnpagedForge(StandInForge):
    """A stand-in Gitea that answers every comment whatever page is asked for (as a forge without
    paging of that list would)."""

    def _page(self, items: list[dict[str, object]], query: dict[str, str],
              problems: list[str]) -> list[dict[str, object]]:
        return items


def test_a_forge_that_does_not_page_comments_is_read_once() -> None:
    with UnpagedForge("gitea", TOKEN, "acme/models") as forge:
        forge.add_pull(1, "feature/a", SHA1)
        for i in range(70):
            forge.add_comment(1, f"comment {i}")
        comment_id = client_for(forge).upsert_comment(1, plan_comment("plan"))
        gets = [r for r in forge.requests if r.method == "GET"]
        assert len(gets) == 2  # page 1 had everything, page 2 nothing new: then it is created
        assert [c["id"] for c in forge.comments_on(1)][-1] == comment_id and len(forge.comments_on(1)) == 71
