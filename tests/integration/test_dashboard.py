"""The dashboard in a real headless Chromium (Playwright, Debian's /usr/bin/chromium) on the real
daemon and the netns hosts, with an API token: the page opened with ?token= follows git pushes
through its event stream without a reload (the new revision, a failing deployment's message, a
review branch's plan, the gateway's request and error rates), loads nothing from elsewhere, and a
screenshot is kept as an artifact."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, git, make_fleet, running

CHROMIUM = "/usr/bin/chromium"
TOKEN = "dashboard-test-t0ken"
sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (dev/test lists it)")
    fleet = make_fleet(tmp_path, clean_hosts, review={"branches": ["review/*"], "timeout": "20s"})
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    config = yaml.safe_load(fleet.config_path.read_text())
    config["api"]["tokenFile"] = str(token_file)
    fleet.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=1)}, "initial")
    with running(fleet):
        yield fleet


def api_status(fleet: Fleet) -> dict[str, Any]:
    response = fleet.api("/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    return response.json() if response.status_code == 200 else {}


def deployment(fleet: Fleet, model: str) -> dict[str, Any]:
    return next((d for d in api_status(fleet).get("deployments", []) if d["model"] == model), {})


def test_the_dashboard_follows_pushes_live_without_a_reload(fleet: Fleet, tmp_path: Path) -> None:
    first = fleet.wait(lambda: deployment(fleet, "echo").get("state") == "success" and api_status(fleet)["revision"],
                       60, "echo ready at the first commit")
    base = f"http://127.0.0.1:{fleet.api_port}"
    assert httpx.get(f"{base}/", trust_env=False).status_code == 401
    assert httpx.get(f"{base}/api/v1/dashboard/events", trust_env=False).status_code == 401

    screenshot = tmp_path / "dashboard.png"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            navigations: list[str] = []
            page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
            page.goto(f"{base}/?token={TOKEN}")
            assert page.locator("#revision").inner_text() == first  # server-rendered
            sync_api.expect(page.locator("#live")).to_contain_text("Live", timeout=10_000)
            page.evaluate("window.__sameDocument = true")

            # A new version and a deployment that cannot be placed (64 CPUs on 2-CPU hosts).
            big = echo_model("big", replicas=1)
            big["spec"]["deployments"][0]["runtime"]["resources"]["cpus"] = 64
            pushed_at = time.monotonic()
            second = fleet.push({"models/echo.yaml": echo_model(version="v2", replicas=1), "models/big.yaml": big},
                                "v2 and big")
            sync_api.expect(page.locator("#revision")).to_have_text(second, timeout=60_000)
            shown_after = time.monotonic() - pushed_at
            failing = fleet.wait(lambda: deployment(fleet, "big").get("state") == "failure"
                                 and deployment(fleet, "big"), 30, "big failing")
            row = page.locator('tr[data-deployment="big/production"]')
            sync_api.expect(row).to_contain_text(failing["message"], timeout=15_000)
            sync_api.expect(row).to_contain_text("failure")
            assert "unschedulable" in failing["message"], failing
            echo = page.locator('tr[data-deployment="echo/production"]')
            fleet.wait(lambda: deployment(fleet, "echo").get("revision") == second
                       and deployment(fleet, "echo").get("state") == "success", 60, "echo v2 ready")
            sync_api.expect(echo).to_contain_text(second[:12], timeout=15_000)
            sync_api.expect(echo).to_contain_text("success")
            # The gateway's traffic: requests to echo, 503s for big (no replica), per deployment.
            for _ in range(20):
                assert fleet.call("echo", "/").status_code == 200
            for _ in range(5):
                assert fleet.call("big", "/").status_code == 503
            rates = fleet.wait(lambda: {d["model"]: d["traffic"] for d in api_status(fleet)["deployments"]
                                        if d.get("traffic", {}).get("rps")}.keys() >= {"echo", "big"}
                               and {d["model"]: d["traffic"] for d in api_status(fleet)["deployments"]}, 20,
                               "request rates of echo and big")
            assert rates["echo"]["errorsPerSecond"] == 0 and rates["big"]["errorsPerSecond"] > 0, rates
            sync_api.expect(page.locator('[data-traffic="echo/production"]')).to_be_visible(timeout=10_000)
            sync_api.expect(page.locator('[data-traffic="big/production"] td.failure')).to_be_visible(timeout=10_000)
            # The passes that did it, with their commits.
            sync_api.expect(page.locator("#s-passes")).to_contain_text(second[:12], timeout=15_000)
            # Hosts: capacity reserved / total (2 CPUs each; echo's one 0.1-CPU replica is the only one placed).
            hosts = page.locator("#s-hosts tbody tr")
            assert hosts.count() == len(fleet.host_names)
            assert sum(h["reserved"]["cpus"] for h in api_status(fleet)["hosts"]) == pytest.approx(0.1)
            sync_api.expect(page.locator("#s-hosts")).to_contain_text("0.1 / 2 (5 %)")

            # A review branch appears among the open review plans, and its link carries the token.
            git(fleet.work, "checkout", "-q", "-b", "review/more", "main")
            fleet.write({"models/echo.yaml": echo_model(version="v2", replicas=2)})
            git(fleet.work, "commit", "-qam", "more echo")
            head = git(fleet.work, "rev-parse", "HEAD")
            git(fleet.work, "push", "-q", "origin", "review/more")
            git(fleet.work, "checkout", "-q", "main")
            link = page.locator(f'#s-reviews a[href*="{head}"]')
            sync_api.expect(link).to_be_visible(timeout=60_000)
            sync_api.expect(page.locator("#s-reviews")).to_contain_text("review/more")

            # No reload happened: the same document received every update.
            assert page.evaluate("window.__sameDocument") is True
            assert navigations == [f"{base}/?token={TOKEN}"]
            assert int(page.locator("body").get_attribute("data-updates") or 0) >= 2
            # Nothing was loaded from anywhere else (no CDN).
            assert requested and all(url.startswith(base) for url in requested), requested
            # The keyboard reaches the skip link first.
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.getAttribute('href')") == "#main"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"\ndashboard screenshot: {screenshot}\nnew revision shown {shown_after:.2f} s after the push")

            # The plan page opens from the dashboard with the token the page was opened with.
            with page.expect_navigation():
                link.click()
            assert page.url == f"{base}/plans/{head}?token={TOKEN}"
            sync_api.expect(page.locator("h1")).to_have_text("modelfleet plan")
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000


def test_an_open_event_stream_does_not_hold_the_daemons_shutdown(fleet: Fleet) -> None:
    fleet.wait(lambda: deployment(fleet, "echo").get("state") == "success", 60, "echo ready")
    url = f"http://127.0.0.1:{fleet.api_port}/api/v1/dashboard/events?token={TOKEN}"
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(5, read=60)) as client, \
            client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == "retry: 3000"
        assert next(lines) == ""
        assert next(lines) == "event: sections"
        assert "echo/production" in next(lines)
        process = fleet.process
        assert process is not None
        started = time.monotonic()
        fleet.stop()  # SIGTERM, with the stream still open
        took = time.monotonic() - started
        rest = list(lines)  # the stream ends (the server closes it) instead of hanging
    assert process.returncode == 0, fleet.log()
    # Under the 5 s the daemon gives its API thread: the stream ended by itself, it was not abandoned.
    assert took < 4, f"the daemon took {took:.1f} s to stop with an event stream open"
    print(f"\nstopped in {took:.2f} s with an event stream open ({len(rest)} more lines)")
