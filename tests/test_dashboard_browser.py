"""The dashboard as a person uses it, in a real browser: Debian's chromium, headless,
driven by selenium through chromium-driver (the test command installs both; under
CI=true a missing one fails, elsewhere it skips).

One gateway (tokens, a policy with named commands, a data dir holding 10,000 old
jobs) and one browser for the module. Programs that must wait for the test read a
FIFO the test writes to, and every wait is on the page's state (selenium's explicit
waits, bounded), never a sleep. Screenshots of each page go to the run's temporary
dir (``screenshots/``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dashboard_support import TOKEN, build_history, write_files
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from sockexec_py.gateway.dashboard.guard import CSP
from sockexec_py.testing.browser import chromium as start_chromium

from conftest import Broker, GatewayProcess, require_tool

HISTORY = 10_000
WAIT = 30.0
T = TypeVar("T")


class Stack:
    def __init__(self, root: Path, broker: Broker, gateway: GatewayProcess) -> None:
        self.root = root
        self.broker = broker
        self.gateway = gateway
        self.shots = root / "screenshots"
        self.shots.mkdir()
        self._fifos = 0

    @property
    def base(self) -> str:
        return self.gateway.base

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, _, data = self.gateway.request(
            method, path, body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status < 300, (status, data)
        return json.loads(data) if data else None

    def submit(self, **body: Any) -> str:
        job_id: str = self.api("POST", "/v1/jobs", body)["id"]
        return job_id

    def fifo(self) -> Path:
        self._fifos += 1
        path = self.root / f"fifo-{self._fifos}"
        os.mkfifo(path)
        return path


def release(fifo: Path) -> None:
    """Let the program waiting on ``fifo`` go on (opening blocks until it reads)."""

    def write() -> None:
        fd = os.open(fifo, os.O_WRONLY)
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(WAIT)
    assert not writer.is_alive(), f"nobody read {fifo}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("dashboard")
    policy, tokens = write_files(root)
    build_history(root / "data", HISTORY)
    broker = Broker(root / "broker.sock", ["--policy", str(policy)])
    try:
        args = ["--data-dir", str(root / "data"), "--token-file", str(tokens)]
        with GatewayProcess(broker.path, *args, "--policy", str(policy)) as gateway:
            yield Stack(root, broker, gateway)
    finally:
        assert broker.stop() == 0, broker.log()


@pytest.fixture(scope="module")
def chromium(stack: Stack) -> Iterator[WebDriver]:
    binary = require_tool("chromium")
    driver = start_chromium(stack.root / "chromium-profile", binary, require_tool("chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium: WebDriver, stack: Stack) -> WebDriver:
    """The browser, logged in (through the login page, as a person does)."""
    chromium.get(stack.base + "/")
    if "/login" in chromium.current_url:
        log_in(chromium, TOKEN)
        # Logged in once the login page has sent us on (with the session cookie).
        until(chromium, lambda d: "/login" not in d.current_url, "the page after the login")
    return chromium


def until(driver: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    """``condition`` once it holds; an element replaced while it is looked at (the
    page navigating, a live update) is looked up again, as a person would look."""
    wait = WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition, what)


def text_of(driver: WebDriver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def log_in(driver: WebDriver, token: str) -> None:
    field = until(driver, lambda d: d.find_element(By.ID, "token"), "the login form")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "login-button").click()


def shoot(driver: WebDriver, stack: Stack, name: str) -> None:
    driver.save_screenshot(str(stack.shots / f"{name}.png"))


def output_text(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.getElementById('output').textContent"))


# -- the scenarios ------------------------------------------------------------------


def test_log_in_with_a_token(chromium: WebDriver, stack: Stack) -> None:
    chromium.delete_all_cookies()
    chromium.get(stack.base + "/queue")
    until(chromium, lambda d: "/login" in d.current_url, "the redirect to the login page")
    shoot(chromium, stack, "login")
    log_in(chromium, "not-the-token")
    until(chromium, lambda d: "not valid" in text_of(d, ".form-error"), "the refusal")
    log_in(chromium, TOKEN)
    until(chromium, lambda d: d.current_url == stack.base + "/queue", "the page asked for first")
    cookie = chromium.get_cookie("sockexec_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert chromium.execute_script("return document.cookie") == ""  # HttpOnly: not for scripts


def test_run_a_command_from_the_form_and_watch_it(browser: WebDriver, stack: Stack) -> None:
    fifo = stack.fifo()
    browser.get(stack.base + "/run")
    form = browser.find_element(By.CSS_SELECTOR, 'form[data-command="talk"]')
    first, second = form.find_elements(By.NAME, "param")
    first.send_keys(str(fifo))
    second.send_keys("hello1")  # the rule says [A-Za-z]{1,20}: the page refuses it
    shoot(browser, stack, "run")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until(
        browser,
        lambda d: "Parameter 2" in form.find_element(By.CLASS_NAME, "form-error").text,
        "the page's refusal",
    )
    assert browser.current_url == stack.base + "/run"
    assert browser.execute_script("return arguments[0].validity.valid", second) is False
    second.clear()
    second.send_keys("hello")
    assert browser.execute_script("return arguments[0].validity.valid", second) is True
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until(browser, lambda d: "/jobs/" in d.current_url, "the job's page")

    def bar() -> str | None:
        value: str | None = browser.find_element(
            By.CSS_SELECTOR, "#job-progress progress"
        ).get_attribute("value")
        return value

    until(browser, lambda d: "[1/3] start hello" in output_text(d), "the first line, live")
    until(browser, lambda d: text_of(d, "#job-state") == "running", "running")
    until(browser, lambda d: bar() == "0", "the bar at task 1 of 3")
    red = until(
        browser, lambda d: d.find_element(By.CSS_SELECTOR, "#output span.ansi-fg-1"), "ANSI red"
    )
    assert red.text == "red" and "\x1b" not in output_text(browser)
    release(fifo)
    until(browser, lambda d: "[2/3] middle" in output_text(d), "the second line, live")
    until(browser, lambda d: bar() == "333", "the bar moving to task 2 of 3")
    assert text_of(browser, "#job-progress .progress-text") == "2/3 · middle"
    shoot(browser, stack, "job")
    release(fifo)
    until(browser, lambda d: text_of(d, "#job-state") == "succeeded", "the end")
    until(browser, lambda d: bar() == "1000", "a full bar")
    assert "[3/3] end" in output_text(browser)
    assert text_of(browser, "#job-exit") == "exit code 0"
    assert not browser.find_elements(By.ID, "cancel")


def test_cancel_a_running_job(browser: WebDriver, stack: Stack) -> None:
    job_id = stack.submit(argv=["sleep", "300"], name="sleeper")
    browser.get(f"{stack.base}/jobs/{job_id}")
    until(browser, lambda d: text_of(d, "#job-state") == "running", "running")
    browser.find_element(By.ID, "cancel").click()
    alert = until(browser, expected_conditions.alert_is_present(), "the confirmation")
    assert alert is not False and "Cancel job sleeper" in alert.text
    alert.dismiss()  # changed my mind: nothing happens
    assert stack.api("GET", f"/v1/jobs/{job_id}")["state"] == "running"
    browser.find_element(By.ID, "cancel").click()
    alert = until(browser, expected_conditions.alert_is_present(), "the confirmation")
    assert alert is not False
    alert.accept()
    until(browser, lambda d: text_of(d, "#job-state") == "cancelled", "cancelled")
    assert text_of(browser, "#job-exit") == "signal TERM"
    assert not browser.find_elements(By.ID, "cancel")
    assert stack.api("GET", f"/v1/jobs/{job_id}")["state"] == "cancelled"


def test_the_list_follows_jobs_without_reloading(browser: WebDriver, stack: Stack) -> None:
    fifo = stack.fifo()
    browser.get(stack.base + "/")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-rows tr"), "the rows")
    browser.execute_script("window.stillThisPage = true")
    succeeded = int(text_of(browser, '#totals [data-state="succeeded"] strong').replace(",", ""))
    script = f'echo "[1/2] first"; read x < {fifo}; echo "[2/2] second"'
    job_id = stack.submit(argv=["sh", "-c", script], name="livecheck")
    row = f'#job-rows tr[data-id="{job_id}"]'
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the new row")
    until(browser, lambda d: text_of(d, f"{row} .progress-text") == "1/2 · first", "its progress")
    assert text_of(browser, f"{row} .state") == "running"
    shoot(browser, stack, "jobs")
    release(fifo)
    until(browser, lambda d: text_of(d, f"{row} .state") == "succeeded", "its end")
    until(
        browser,
        lambda d: text_of(d, '#totals [data-state="succeeded"] strong') == f"{succeeded + 1:,}",
        "the totals",
    )
    assert browser.execute_script("return window.stillThisPage") is True


def test_page_through_ten_thousand_jobs(browser: WebDriver, stack: Stack) -> None:
    browser.get(stack.base + "/")
    browser.find_element(By.ID, "filter-name").send_keys("bulk")
    Select(browser.find_element(By.ID, "filter-limit")).select_by_value("500")
    browser.find_element(By.CSS_SELECTOR, ".filters button").click()
    until(browser, lambda d: "name=bulk" in d.current_url, "the filtered list")
    assert text_of(browser, '#totals [data-state="succeeded"] strong') != "0"
    seen: list[str] = []
    pages = 0
    while True:
        rows = browser.find_elements(By.CSS_SELECTOR, "#job-rows tr")
        ids = browser.execute_script(
            "return [...document.querySelectorAll('#job-rows tr')].map(r => r.dataset.id)"
        )
        assert len(ids) == 500
        seen.extend(ids)
        pages += 1
        older = browser.find_elements(By.ID, "next-page")
        if not older:
            break
        older[0].click()
        until(browser, expected_conditions.staleness_of(rows[0]), "the next page")
    assert pages == HISTORY // 500
    assert len(set(seen)) == HISTORY and seen == sorted(seen, reverse=True)
    browser.find_element(By.ID, "first-page").click()
    until(browser, lambda d: "cursor" not in d.current_url, "back to the newest")


XSS = [
    "<script>document.title='pwned'</script>",
    '<img src=x onerror="window.xss=1">',
    "\"'><svg onload=window.xss=2>",
    "</code></td><script>window.xss=3</script>",
]


def test_payloads_in_jobs_stay_text(browser: WebDriver, stack: Stack) -> None:
    printed = "printf '\\033[31m<b onmouseover=window.xss=4>bold?</b>\\033[0m\\n%s\\n' \"$@\""
    job_ids = [
        stack.submit(argv=["echo", *XSS], labels={"note": XSS[1], "t": XSS[3]}),
        stack.submit(argv=["sh", "-c", printed, "sh", *XSS], name="xss", labels={"x": XSS[0]}),
    ]
    for job_id in job_ids:
        assert stack.api("GET", f"/v1/jobs/{job_id}?wait=30")["state"] == "succeeded"

    def inert(title: str) -> None:
        assert browser.title == title
        assert browser.execute_script("return window.xss") is None
        injected = browser.find_elements(By.CSS_SELECTOR, "main script, main img, main svg, main b")
        assert injected == []
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - reading it is the check

    browser.get(stack.base + "/")
    until(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{job_ids[0]}"]'),
        "the rows",
    )
    inert("Jobs · sockexec")
    assert XSS[1] in text_of(browser, f'tr[data-id="{job_ids[0]}"] .argv')  # shell-quoted
    for job_id in job_ids:
        browser.get(f"{stack.base}/jobs/{job_id}")
        until(browser, lambda d: XSS[1] in output_text(d), "the payloads, as text")
        inert(browser.title)
        assert "pwned" not in browser.title
    assert XSS[0] in text_of(browser, "#job-labels")
    assert "<b onmouseover=window.xss=4>bold?</b>" in output_text(browser)
    # The CSP is there and the browser enforces it: an inline script does not run.
    ran = browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.inline = 1';"
        "document.body.append(s); return window.inline === 1"
    )
    assert ran is False
    _, headers, _ = stack.gateway.request("GET", "/login")
    assert headers["content-security-policy"] == CSP


def test_the_queue_view(browser: WebDriver, stack: Stack) -> None:
    job_ids = [stack.submit(argv=["sleep", "300"], name="nightly") for _ in range(3)]
    browser.get(stack.base + "/queue")
    row = 'tr[data-name="nightly"]'
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the queue's row")
    until(browser, lambda d: text_of(d, f"{row} .running") == "1 / 1", "one running of one")
    assert text_of(browser, f"{row} .waiting") == "2"
    shoot(browser, stack, "queue")
    for job_id in reversed(job_ids):
        stack.api("POST", f"/v1/jobs/{job_id}/cancel")
    until(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row), "the queue emptied, live")


def test_a_task_page_follows_its_steps(browser: WebDriver, stack: Stack) -> None:
    """A sequential task's page shows each step's state as it changes, without a
    reload: the second step waits on a FIFO until the test lets it go."""
    fifo = stack.fifo()
    job_id = stack.submit(
        name="pipeline",
        mode="sequential",
        steps=[
            {"name": "first", "argv": ["true"]},
            {"name": "wait", "argv": ["sh", "-c", f'read x < "{fifo}"']},
            {"name": "last", "argv": ["sh", "-c", "exit 5"]},
        ],
    )
    browser.get(f"{stack.base}/jobs/{job_id}")

    def states(driver: WebDriver) -> list[str]:
        cells = driver.find_elements(By.CSS_SELECTOR, "#steps tr.step td:nth-child(3)")
        return [cell.text for cell in cells]

    until(browser, lambda d: states(d) == ["succeeded", "running", "queued"], "step 2 running")
    browser.execute_script("window.sameDocument = true")  # gone if the page reloads
    release(fifo)
    until(browser, lambda d: states(d) == ["succeeded", "succeeded", "failed"], "steps ended")
    until(browser, lambda d: text_of(d, "#job-state") == "failed", "the task failed")
    row = browser.find_elements(By.CSS_SELECTOR, "#steps tr.step")[2]
    assert [cell.text for cell in row.find_elements(By.TAG_NAME, "td")][3] == "5"
    # Still the same document: the states came through the live feed.
    assert browser.execute_script("return window.sameDocument === true")
    shoot(browser, stack, "task")
