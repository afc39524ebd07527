"""The gateway's live /dashboard in Debian's headless Chromium, as an operator uses it.

A real deployment (control plane, orchestrator, echo, slow, a gateway that wants a token and
knows a Jaeger UI address) exporting traces to a real OTLP receiver. On RabbitMQ only: the
page reads nothing but the gateway's HTTP routes over a Client, which test_gateway.py proves
alike on both brokers, and a browser run is too slow to pay for twice. Each stage is kept as
a screenshot in test-artifacts/dashboard/.
"""

import json
import re
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from .deployment import Deployment, serving, start_gateway
from .otlp_receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JAEGER = "http://jaeger.example:16686"
PATIENCE = 60_000  # ms Playwright waits for the page to show something (a slow, shared machine)


@dataclass
class Gateway:
    url: str
    deployment: Deployment
    receiver: Receiver


@pytest.fixture(scope="module")
def gateway(rabbit_url, tmp_path_factory) -> Iterator[Gateway]:
    with Receiver() as receiver:
        deployment = Deployment(rabbit_url, tmp_path_factory.mktemp("dashboard"))
        deployment.overrides = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with serving(deployment, "echo", "slow"):
            url = start_gateway(deployment, "gateway", CONVEYOR_GATEWAY_TOKEN=TOKEN,
                                CONVEYOR_JAEGER_UI_URL=JAEGER)
            yield Gateway(url, deployment, receiver)


@pytest.fixture(scope="module")
def browser(gateway) -> Iterator[Browser]:
    """Chromium, launched after the deployment has started: Playwright's sync API keeps an
    event loop in this thread, where the deployment's helpers call asyncio.run."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the dashboard is tested in Debian's Chromium "
                    "(apt-get install chromium; .ci/run installs it)", pytrace=False)
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to start as root, as CI runs.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, gateway) -> Iterator[Page]:
    """The dashboard, opened with the token in the address's fragment."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(PATIENCE)
    opened = context.new_page()
    opened.goto(f"{gateway.url}/dashboard#token={TOKEN}")
    yield opened
    context.close()


@pytest.fixture
def http(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=60) as client:
        yield client


def screenshot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


def start(http: httpx.Client, workflow: str, **start_event) -> str:
    task_id = f"dash-{uuid.uuid4().hex[:12]}"
    answer = http.post(f"/workflows/{workflow}/run-nowait",
                       json={"start_event": start_event, "handler_id": task_id})
    assert answer.status_code == 200, answer.text
    return task_id


def find_and_open(page: Page, task_id: str, status: str = "") -> None:
    """Filter the task list by status and by a piece of the id, then open the task."""
    page.select_option("#status-filter", value=status)
    page.fill("#search", task_id[-8:])
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(task_id)
    rows.first.click()
    expect(page.locator("#task-id")).to_have_text(task_id)


def test_the_page_asks_for_the_token_then_shows_each_service_with_its_live_instance(
    browser, gateway,
):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(PATIENCE)
    page = context.new_page()
    try:
        page.goto(f"{gateway.url}/dashboard")
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#connection")).to_have_text("gateway: the gateway wants its token")
        screenshot(page, "01-token-asked")

        page.fill("#token", "not-the-token")
        page.click("text=Use token")
        expect(page.locator("#token-problem")).to_have_text("the gateway refused this token")
        page.fill("#token", TOKEN)
        page.click("text=Use token")

        expect(page.locator("#token-form")).to_be_hidden()
        for service in ("echo", "slow"):
            row = page.locator(f"#services tbody tr[data-service={service}]")
            expect(row.locator(".instance.alive")).to_contain_text(": alive, running")
        screenshot(page, "02-services")
    finally:
        context.close()


def test_the_token_in_the_address_is_kept_for_the_tab_and_leaves_the_address_bar(page):
    expect(page.locator("#services tbody tr[data-service=echo]")).to_be_visible()
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('conveyor.gateway.token')") == TOKEN
    expect(page.locator("#token-form")).to_be_hidden()


def test_a_running_task_streams_its_events_pauses_and_resumes_to_completion(page, http):
    task_id = start(http, "echo", events=20, pause=1)

    find_and_open(page, task_id, status="running")
    timeline = page.locator("#timeline tbody tr")
    expect(timeline.nth(1)).to_contain_text("Progress")
    expect(timeline.nth(0)).to_contain_text('{"step":1,"of":20}')
    expect(page.locator("#task-status")).to_have_text("running")
    screenshot(page, "03-events-streaming")

    page.click("#pause")
    expect(page.locator("#action-result")).to_have_text("paused")
    expect(page.locator("#task-status")).to_have_text("paused")
    expect(page.locator("#resume")).to_be_enabled()
    expect(page.locator("#pause")).to_be_disabled()
    screenshot(page, "04-paused")

    page.click("#resume")
    expect(page.locator("#action-result")).to_have_text("resumed")
    expect(page.locator("#task-status")).to_have_text("completed", timeout=2 * PATIENCE)
    expect(page.locator("#timeline tbody")).to_contain_text('{"step":20,"of":20}')
    expect(page.locator("#timeline-end")).to_contain_text("completed at")
    for button in ("#cancel", "#pause", "#resume"):
        expect(page.locator(button)).to_be_disabled()
    screenshot(page, "05-resumed-and-completed")

    # The status filter: it is among the completed tasks now, and not among the failed.
    page.select_option("#status-filter", value="failed")
    expect(page.locator("#tasks tbody")).to_have_text("no task matches")
    page.select_option("#status-filter", value="completed")
    expect(page.locator("#tasks tbody tr")).to_have_count(1)
    expect(page.locator("#tasks tbody tr.selected")).to_contain_text(task_id)


def test_the_cancel_button_cancels_a_running_task(page, http):
    task_id = start(http, "slow", seconds=600)

    find_and_open(page, task_id, status="running")
    page.click("#cancel")

    expect(page.locator("#action-result")).to_have_text("cancelled")
    expect(page.locator("#task-status")).to_have_text("cancelled")
    expect(page.locator("#task-error")).to_contain_text("cancelled from the dashboard")
    expect(page.locator("#timeline-end")).to_contain_text("cancelled at")
    screenshot(page, "06-cancelled")


def test_the_chart_counts_the_tasks_finished_in_the_last_hour(page, http):
    assert http.post("/workflows/echo/run", json={"start_event": {"fail": "on purpose"}}
                     ).json()["status"] == "failed"
    assert http.post("/workflows/echo/run", json={"start_event": {"n": 1}}
                     ).json()["status"] == "completed"
    # The deployment is this module's own: every task it ever finished did so this hour.
    finished = {status: len(http.get("/handlers", params={"status": status}).json()["handlers"])
                for status in ("completed", "failed", "cancelled")}

    for status, count in finished.items():  # the page reads the chart every 5 s
        expect(page.locator(f"#{status}-total")).to_have_text(str(count), timeout=12_000)
    chart = page.locator("#throughput-chart svg")
    expect(chart.locator("rect.completed").first).to_be_attached()
    expect(chart.locator("rect.failed").first).to_be_attached()
    a_failure = chart.locator("title").filter(has_text=re.compile(r"[1-9]\d* failed"))
    expect(a_failure.first).to_be_attached()
    screenshot(page, "07-throughput")


def test_a_traced_task_links_to_its_trace_in_the_jaeger_ui(page, http, gateway):
    task_id = start(http, "echo", message="traced")

    find_and_open(page, task_id)
    expect(page.locator("#task-status")).to_have_text("completed")
    link = page.locator("#trace-link")
    expect(link).to_be_visible()

    with sqlite3.connect(gateway.deployment.workdir / "state.db") as db:
        (carrier,) = db.execute("SELECT trace FROM dispatches WHERE task_id = ?",
                                (task_id,)).fetchone()
    trace_id = json.loads(carrier)["traceparent"].split("-")[1]
    expect(link).to_have_attribute("href", f"{JAEGER}/trace/{trace_id}")
    assert trace_id in {span.trace_id for span in gateway.receiver.spans}
    screenshot(page, "08-trace-link")


def test_the_page_and_its_data_want_the_token(gateway, http):
    with httpx.Client(base_url=gateway.url, timeout=30) as anonymous:
        page = anonymous.get("/dashboard")
        slashed = anonymous.get("/dashboard/", follow_redirects=True)
        data = [anonymous.get("/dashboard/api/services"),
                anonymous.get("/dashboard/api/tasks"),
                anonymous.post("/dashboard/api/tasks/anything/cancel")]
    with_token = http.get("/dashboard")

    # Without the token the page is the body of a 401: it asks for the token, holds no data.
    assert page.status_code == 401 and page.headers["www-authenticate"] == "Bearer"
    assert "text/html" in page.headers["content-type"] and 'id="token-form"' in page.text
    assert slashed.status_code == 401 and slashed.url.path == "/dashboard"
    assert [answer.status_code for answer in data] == [401, 401, 401]
    assert with_token.status_code == 200 and with_token.text == page.text


def test_bad_requests_get_a_4xx_that_names_the_problem(http):
    unknown = http.get("/dashboard/api/tasks/no-such-task")
    steer_unknown = http.post("/dashboard/api/tasks/no-such-task/pause")
    bad_status = http.get("/dashboard/api/tasks", params={"status": "sleeping"})
    bad_action = http.post("/dashboard/api/tasks/no-such-task/explode")
    bad_after = http.get("/dashboard/api/tasks/no-such-task", params={"after": "soon"})
    bad_minutes = http.get("/dashboard/api/throughput", params={"minutes": 0})

    assert unknown.status_code == 404 and "no-such-task" in unknown.json()["detail"]
    assert steer_unknown.status_code == 404 and "no-such-task" in steer_unknown.json()["detail"]
    assert bad_status.status_code == 422 and "status" in bad_status.text
    assert "'running'" in bad_status.text  # and which statuses there are
    assert bad_action.status_code == 422 and "action" in bad_action.text
    assert bad_after.status_code == 422 and "after" in bad_after.text
    assert bad_minutes.status_code == 422 and "minutes" in bad_minutes.text
