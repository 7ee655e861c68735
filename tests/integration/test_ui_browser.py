"""The Airflow UI in a real browser (Debian's chromium through selenium), served as ``make ui`` serves it.

``airflow standalone`` runs on a free port in a private AIRFLOW_HOME with the project's DAGs and
plugins; a person logs in with the admin password standalone generated, finds the pipeline DAGs,
opens the training form, triggers an ingest of a real drop and opens the validation report from
the task's extra link. Every step leaves a screenshot in the output folder printed below
(``.state/test-output/ui-browser/`` unless ``CONVEYOR_TEST_OUTPUT`` says otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from helpers import churn_csv, free_port, write_drop

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CONVEYOR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CONVEYOR_CHROMEDRIVER", "/usr/bin/chromedriver")
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 240
WAIT_S = 60
PROJECT = Path(__file__).resolve().parents[2]


def output_dir() -> Path:
    """Where screenshots and the server log go (emptied at the start of the module)."""
    root = Path(os.environ.get("CONVEYOR_TEST_OUTPUT", PROJECT / ".state" / "test-output"))
    return root / "ui-browser"


def get_json(url: str, token: str | None = None, data: dict | None = None) -> dict:
    """A JSON answer of the API server (POST when there is data)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(data).encode() if data is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=120) as response:
        return json.loads(response.read())


class Server:
    """The running ``airflow standalone``: its address, home, lake and log."""

    def __init__(self, url: str, home: Path, lake_root: Path, log: Path, process: subprocess.Popen):
        self.url = url
        self.home = home
        self.lake_root = lake_root
        self.log = log
        self.process = process

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def password(self) -> str:
        """The admin password standalone generated (the simple auth manager keeps it in AIRFLOW_HOME)."""
        return json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]

    def token(self) -> str:
        return get_json(f"{self.url}/auth/token", data={"username": "admin", "password": self.password()})[
            "access_token"
        ]


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = output_dir()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"UI browser test output: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser_binaries() -> None:
    """Debian's chromium and chromedriver, installed by the project's script when missing."""
    script = PROJECT / "scripts" / "install-browser.sh"
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0 or not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"chromium could not be installed by {script}: {(result.stderr or result.stdout).strip()[-600:]}")


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory, shots) -> Server:
    """``airflow standalone`` (what ``make ui`` runs) on a free port, in its own process group."""
    root = tmp_path_factory.mktemp("airflow-ui")
    home, lake_root = root / "airflow", root / "lake"
    home.mkdir()
    lake_root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "CONVEYOR_STATE_DIR": str(root),
        "CONVEYOR_LAKE_URI": lake_root.as_uri(),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": url,  # also where tasks reach the execution API
        "AIRFLOW__CORE__PARALLELISM": "4",  # LocalExecutor starts this many worker processes
        # The log servers too, so another Airflow on this machine (make ui, a second test) is no obstacle.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    for name in (
        "AIRFLOW__CORE__UNIT_TEST_MODE",
        "CONVEYOR_LAKE_CONN_ID",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS",
    ):
        env.pop(name, None)
    log = shots / "standalone.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=env,
            cwd=PROJECT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(url, home, lake_root, log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"airflow standalone exited with {process.returncode}:\n{server.log_tail()}")
            try:
                health = get_json(f"{url}/api/v2/monitor/health")
                if all(part.get("status") == "healthy" for part in health.values()):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Airflow was not healthy after {START_TIMEOUT_S}s:\n{server.log_tail()}")
            time.sleep(1)
        # The API server builds its execution API on the first call (~20s on 2 busy cores, which blocks
        # it); make that call now rather than in the first task, whose client would back off for longer.
        get_json(f"{url}/execution/health")
        yield server
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Stop standalone and every process it started (they share its process group)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                process.poll()
                return
            process.poll()  # reap standalone itself so the group can empty
            time.sleep(0.5)


@pytest.fixture(scope="module")
def browser(browser_binaries):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


class Steps:
    """A person in the browser: waits on what is visible (never sleeps), screenshots every step."""

    def __init__(self, driver, server: Server, folder: Path):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.server = server
        self.folder = folder
        self.wait = WebDriverWait(driver, WAIT_S)
        self.count = len(list(folder.glob("*.png")))

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def until(self, condition, what: str):
        """Wait for a condition; on timeout, fail saying what was awaited, with a screenshot."""
        from selenium.common.exceptions import TimeoutException

        try:
            return self.wait.until(condition)
        except TimeoutException:
            shot = self.shot("FAILED")
            pytest.fail(f"waited {WAIT_S}s for {what} (at {self.driver.current_url}); screenshot: {shot}")

    def visible(self, by: str, value: str):
        from selenium.webdriver.support import expected_conditions as EC

        return self.until(EC.visibility_of_element_located((by, value)), f"{value!r} to be visible")

    def text(self, text: str, within: str = "//body"):
        """The element showing exactly this text, all of it or its own part (waits until it is visible)."""
        from selenium.webdriver.common.by import By

        literal = json.dumps(text)
        return self.visible(
            By.XPATH, f"{within}//*[normalize-space()={literal} or text()[normalize-space()={literal}]]"
        )

    def says(self, text: str) -> None:
        """Wait until the page's text contains this."""
        from selenium.webdriver.common.by import By

        self.visible(By.XPATH, f"//body[contains(normalize-space(.), {json.dumps(text)})]")

    def at(self, url: str) -> None:
        self.until(lambda d: d.current_url == url, f"the browser to be at {url}")

    def open(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def login_if_asked(self) -> None:
        """Log in on Airflow's login page when the browser is there."""
        from selenium.webdriver.common.by import By

        self.until(lambda d: d.execute_script("return document.readyState") == "complete", "the page to load")
        if "/auth/login" not in self.driver.current_url:
            return
        self.visible(By.NAME, "username").send_keys("admin")
        self.driver.find_element(By.NAME, "password").send_keys(self.server.password())
        self.shot("login")
        self.driver.find_element(By.XPATH, "//button[@type='submit']").click()
        self.until(lambda d: "/auth/login" not in d.current_url, "the login to succeed")


@pytest.fixture(scope="module")
def person(browser, airflow_ui, shots) -> Steps:
    """A logged-in person: the first page sends them to the login form, which they fill in."""
    steps = Steps(browser, airflow_ui, shots)
    steps.open("/")
    steps.until(lambda d: "/auth/login" in d.current_url, "Airflow to ask an anonymous visitor to log in")
    steps.login_if_asked()
    return steps


def expected_dags() -> set[str]:
    from conveyor.factory import build_all

    return {dag_id for dag_id in build_all() if dag_id != "conveyor__invalid_pipelines"}


def test_pipeline_dags_are_listed(person):
    dags = expected_dags()
    assert {"churn__ingest", "churn__train"} <= dags
    person.open("/dags?tags=conveyor")
    for dag_id in sorted(dags):
        person.text(dag_id)
    person.text(f"{len(dags)} Dags")
    person.shot("dags-tagged-conveyor")


def test_train_form_shows_the_pipeline_params(person):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC

    from conveyor.spec import get_spec

    spec = get_spec("churn")
    person.open("/dags/churn__train")
    person.visible(By.CSS_SELECTOR, "[data-testid=trigger-dag-button]").click()
    dialog = "//*[@role='dialog'][.//*[normalize-space()='Trigger Dag - churn__train']]"
    person.visible(By.XPATH, dialog)
    for label in (
        "Run Parameters",
        "Dataset version",
        "Time budget (seconds)",
        "Deploy once approved",
        "AutoGluon presets",
    ):
        person.text(label, within=dialog)
    driver = person.driver
    assert driver.find_element(By.NAME, "element_dataset_version").get_attribute("value") == ""
    assert driver.find_element(By.NAME, "element_time_limit").get_attribute("value") == str(spec.trainer.time_limit)
    assert driver.find_element(By.NAME, "element_deploy").is_selected() is spec.deploy.endpoint.enabled
    assert driver.find_element(By.NAME, "element_presets").get_attribute("value") == spec.trainer.presets
    person.text(spec.trainer.presets, within=dialog)
    person.shot("train-trigger-form")
    # The defaults are a valid form: a person can train by hand without filling anything in.
    trigger = driver.find_element(By.XPATH, f"{dialog}//button[normalize-space()='Trigger']")
    assert trigger.is_enabled()
    driver.execute_script("arguments[0].scrollIntoView({block: 'end'})", trigger)
    person.shot("train-trigger-form-params")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close it; nothing is triggered
    person.until(EC.invisibility_of_element_located((By.XPATH, dialog)), "the form to close")


def wait_for_validation(server: Server) -> str:
    """The run of ``churn__ingest`` whose validate task succeeded (standalone's scheduler runs it)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    token = None
    while time.monotonic() < deadline:
        try:
            token = token or server.token()
            tis = get_json(f"{server.url}/api/v2/dags/churn__ingest/dagRuns/~/taskInstances", token)["task_instances"]
        except (urllib.error.URLError, TimeoutError):  # a busy server; the deadline decides
            continue
        for ti in tis:
            if ti["task_id"] == "validate" and ti["state"] == "success":
                return ti["dag_run_id"]
            if ti["task_id"] in ("ingest", "validate") and ti["state"] in ("failed", "upstream_failed"):
                pytest.fail(
                    f"churn__ingest {ti['task_id']} {ti['state']} in {ti['dag_run_id']}; logs in {server.home}/logs"
                )
        time.sleep(2)
    pytest.fail(f"churn__ingest did not validate the drop within {RUN_TIMEOUT_S}s:\n{server.log_tail()}")


def test_validation_report_opens_from_the_task_link(person, airflow_ui):
    from selenium.webdriver.common.by import By

    from conveyor.lake import Lake

    write_drop(Lake(root=airflow_ui.lake_root.as_uri()), "drop-ui", {"customers.csv": churn_csv(300)})
    person.open("/dags/churn__ingest")
    person.visible(By.CSS_SELECTOR, "[data-testid=trigger-dag-button]").click()
    dialog = "//*[@role='dialog'][.//*[normalize-space()='Trigger Dag - churn__ingest']]"
    person.text("Unpause churn__ingest on trigger", within=dialog)
    person.shot("ingest-trigger-form")
    person.visible(By.XPATH, f"{dialog}//button[normalize-space()='Trigger']").click()
    person.until(lambda d: "/dags/churn__ingest/runs/" in d.current_url, "the new run's page")
    person.text(unquote(person.driver.current_url.rsplit("/runs/", 1)[1]))
    person.says("ValidateDatasetOperator")
    person.shot("ingest-run")

    run_id = wait_for_validation(airflow_ui)
    person.open(f"/dags/churn__ingest/runs/{quote(run_id, safe='')}/tasks/validate")
    person.visible(By.XPATH, "//a[normalize-space()='Details']").click()
    link = person.visible(By.LINK_TEXT, "Validation report")
    href = link.get_attribute("href")
    report = f"{airflow_ui.url}/conveyor/reports/churn__ingest/{quote(run_id, safe='')}/validation/"
    assert href == report
    person.shot("validate-task-extra-link")
    link.click()
    person.at(report)
    person.until(lambda d: d.title == "Data validation | Conveyor", "the validation report's index")
    person.says("Passed")
    person.shot("validation-report")
    person.visible(By.XPATH, "//a[contains(@href, 'validations/')]").click()  # GX's page, read without JavaScript
    person.says("Expectation Validation Result")
    person.shot("validation-result")

    # The run's report index lists it too; a run that does not exist is a clear 404.
    person.open(report.removeprefix(airflow_ui.url).removesuffix("validation/"))
    person.visible(By.LINK_TEXT, "Data validation").click()
    person.at(report)
    person.open("/conveyor/reports/churn__ingest/no-such-run/validation/")
    person.says("has no run 'no-such-run'")
    person.shot("report-of-unknown-run")


def test_report_viewer_asks_for_login_first(person, airflow_ui):
    from selenium.webdriver.common.by import By

    page = "/conveyor/reports/churn__ingest/no-such-run/"
    person.driver.delete_all_cookies()
    person.open(page)
    person.until(lambda d: "/auth/login" in d.current_url, "the report viewer to send a stranger to log in")
    person.visible(By.NAME, "username")
    person.shot("report-login")
    person.login_if_asked()
    person.at(airflow_ui.url + page)
    person.says("has no run 'no-such-run'")


INJECTED = "<script>document.title='pwned';window.conveyorPwned=1</script>"
INJECTED_IMG = '"><img src=x onerror="document.title=\'pwned\';window.conveyorPwned=1">'


def wait_for_failed_validation(server: Server) -> str:
    """The ``churn__ingest`` run whose validate task failed: the one that took the rejected drop (the module's
    only bad drop; whichever run's sensor was waiting takes it, a scheduled one or the one triggered here)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    token = None
    while time.monotonic() < deadline:
        try:
            token = token or server.token()
            tis = get_json(f"{server.url}/api/v2/dags/churn__ingest/dagRuns/~/taskInstances", token)["task_instances"]
        except (urllib.error.URLError, TimeoutError):
            continue
        for ti in tis:
            if ti["task_id"] == "validate" and ti["state"] == "failed":
                return ti["dag_run_id"]
        time.sleep(2)
    pytest.fail(f"no churn__ingest run failed validation within {RUN_TIMEOUT_S}s:\n{server.log_tail()}")


def not_run(driver) -> None:
    """The page's own scripts did not run (title untouched, no flag); WebDriver's script is not the page's."""
    assert driver.title != "pwned"
    assert driver.execute_script("return window.conveyorPwned === undefined") is True


def test_a_script_in_a_drop_does_not_run_in_its_validation_report(person, airflow_ui):
    from selenium.webdriver.common.by import By

    from conveyor.lake import Lake

    lake = Lake(root=airflow_ui.lake_root.as_uri())
    contract = [INJECTED if i % 3 == 0 else INJECTED_IMG if i % 3 == 1 else "one-year" for i in range(300)]
    write_drop(lake, "drop-zz-injected", {"customers.csv": churn_csv(300, contract=contract)})
    token = airflow_ui.token()
    unpause = urllib.request.Request(
        f"{airflow_ui.url}/api/v2/dags/churn__ingest",
        data=json.dumps({"is_paused": False}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="PATCH",
    )
    urllib.request.urlopen(unpause, timeout=120).close()
    get_json(f"{airflow_ui.url}/api/v2/dags/churn__ingest/dagRuns", token, data={"logical_date": None})
    run_id = wait_for_failed_validation(airflow_ui)

    report = f"/conveyor/reports/churn__ingest/{quote(run_id, safe='')}/validation/"
    person.open(report)
    person.login_if_asked()
    person.until(lambda d: d.title == "Data validation | Conveyor", "the failed validation's report")
    person.says("Failed")
    person.says(INJECTED)  # the value is shown, as text
    not_run(person.driver)
    body = person.driver.find_element(By.TAG_NAME, "body")
    assert body.value_of_css_property("font-family").startswith("system-ui")  # the shipped stylesheet loaded
    person.shot("injected-validation-index")
    person.visible(By.XPATH, "//a[contains(@href, 'validations/')]").click()
    person.says("Sampled Unexpected Values")
    person.says(INJECTED)
    not_run(person.driver)
    person.shot("injected-validation-result")

    # Any HTML in the run's report folder is served under the sandboxing policy: its scripts never run.
    raw = lake.reports("churn", run_id) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "index.html").write_text(
        f"<html><head><title>raw report</title></head><body>{INJECTED}{INJECTED_IMG}</body></html>"
    )
    person.open(report.replace("/validation/", "/raw/"))
    person.until(lambda d: d.title == "raw report", "the raw page")
    not_run(person.driver)
    person.shot("raw-report-with-script")
