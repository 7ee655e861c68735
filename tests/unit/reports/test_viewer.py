"""Conveyor's report viewer (the plugin's FastAPI app) on a real local lake.

Airflow's login and permission check, and the metadata database, are replaced at the dependency
boundary; the browser test (tests/integration/test_ui_browser.py) runs them for real.
"""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

RUN = "manual__2026-01-02T03:04:05+00:00"
BASE = "/reports/churn__ingest/manual__2026-01-02T03%3A04%3A05%2B00%3A00"


class FakeSession:
    """Answers the viewer's one query: does this DAG have this run?"""

    def __init__(self, runs: set[tuple[str, str]]):
        self.runs = runs
        self.asked: list[tuple[str, str]] = []

    def scalar(self, statement):
        params = statement.compile().params
        key = (params["dag_id_1"], params["run_id_1"])
        self.asked.append(key)
        return 1 if key in self.runs else None


def access_dependency(app):
    """The permission check the report route declares (Airflow's requires_access_dag)."""
    (route,) = [r for r in app.routes if getattr(r, "path", "") == "/reports/{dag_id}/{run_id}/{path:path}"]
    (dependency,) = route.dependencies
    return dependency.dependency


@pytest.fixture
def viewer(lake):
    from airflow.api_fastapi.common.db.common import _get_session

    from conveyor.reports.viewer import app

    session = FakeSession({("churn__ingest", RUN)})

    def fake_session():
        yield session

    app.dependency_overrides[_get_session] = fake_session
    app.dependency_overrides[access_dependency(app)] = lambda: None
    folder = lake.reports("churn", RUN)
    (folder / "validation" / "static").mkdir(parents=True)
    (folder / "validation" / "index.html").write_text("<html><title>Data Docs</title>checks</html>")
    (folder / "validation" / "static" / "style.css").write_text("body { color: red }")
    (folder / "gate").mkdir()
    (folder / "gate" / "index.html").write_text("<html>gate passed</html>")
    (folder / "scratch").mkdir()  # no index.html: not a report
    (folder / "scratch" / "notes.txt").write_text("x")
    client = TestClient(app)
    client.session = session
    yield client
    app.dependency_overrides.clear()


def test_serves_a_report_folder_and_its_files(viewer):
    page = viewer.get(f"{BASE}/validation/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == "<html><title>Data Docs</title>checks</html>"
    style = viewer.get(f"{BASE}/validation/static/style.css")
    assert (style.status_code, style.text) == (200, "body { color: red }")
    assert style.headers["content-type"].startswith("text/css")
    assert style.headers["x-content-type-options"] == "nosniff"
    assert viewer.session.asked == [("churn__ingest", RUN)] * 2


def test_a_folder_without_slash_is_redirected_so_relative_links_work(viewer):
    answer = viewer.get(f"{BASE}/validation", follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == "validation/"
    assert viewer.get(f"{BASE}/validation").text == "<html><title>Data Docs</title>checks</html>"


def test_run_index_lists_the_reports_it_has(viewer):
    page = viewer.get(f"{BASE}/")
    assert page.status_code == 200
    assert '<a href="gate/">Gate decision</a>' in page.text
    assert '<a href="validation/">Data validation</a>' in page.text
    assert page.text.index("gate/") < page.text.index("validation/")
    assert "scratch" not in page.text


def test_run_index_of_a_run_without_reports(viewer):
    viewer.session.runs.add(("churn__train", "manual__empty"))
    page = viewer.get("/reports/churn__train/manual__empty/")
    assert page.status_code == 200
    assert "This run wrote no report yet." in page.text


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        (
            f"{BASE}/validation/missing.html",
            404,
            f"run {RUN!r} of 'churn__ingest' has no report file 'validation/missing.html'",
        ),
        ("/reports/churn__ingest/manual__other/validation/", 404, "DAG 'churn__ingest' has no run 'manual__other'"),
        (f"/reports/plain_dag/{RUN}/validation/", 404, "DAG 'plain_dag' is not a Conveyor pipeline DAG"),
        (f"{BASE}/validation/%2e%2e/%2e%2e/%2e%2e/secrets.txt", 400, "segments must not start with '.'"),
        (f"{BASE}/.hidden", 400, "segments must not start with '.'"),
    ],
)
def test_bad_requests_get_a_clear_4xx(viewer, path, status, message):
    answer = viewer.get(path)
    assert answer.status_code == status
    assert message in answer.json()["detail"]


def test_no_permission_no_report(viewer):
    from conveyor.reports.viewer import app

    def deny():
        raise HTTPException(403, "Forbidden")

    app.dependency_overrides[access_dependency(app)] = deny
    answer = viewer.get(f"{BASE}/validation/")
    assert answer.status_code == 403
    assert "checks" not in answer.text
    assert viewer.session.asked == []


def test_a_browser_that_is_not_logged_in_goes_to_the_login_page(viewer, monkeypatch):
    import airflow.api_fastapi.app as api_app

    from conveyor.reports.viewer import app

    def anonymous():
        raise HTTPException(401, "Not authenticated")

    class AuthManager:
        def get_url_login(self, next_url: str) -> str:
            return f"/auth/login?next={next_url}"

    app.dependency_overrides[access_dependency(app)] = anonymous
    monkeypatch.setattr(api_app, "get_auth_manager", lambda: AuthManager())
    browser = viewer.get(f"{BASE}/validation/", headers={"Accept": "text/html,*/*"}, follow_redirects=False)
    assert browser.status_code == 303
    assert browser.headers["location"] == f"/auth/login?next=http://testserver{BASE}/validation/"
    script = viewer.get(f"{BASE}/validation/", headers={"Accept": "application/json"})
    assert (script.status_code, script.json()) == (401, {"detail": "Not authenticated"})


def test_pipeline_of_dag_ids():
    from conveyor.reports.viewer import pipeline_of

    assert pipeline_of("churn__train") == "churn"
    assert pipeline_of("a__b__batch_predict") == "a__b"
    for bad in ("train", "__train", "churn__"):
        with pytest.raises(HTTPException):
            pipeline_of(bad)


EVIL_PAGE = "<html><body><script>document.title='pwned'</script><img src=x onerror=alert(1)></body></html>"


@pytest.mark.parametrize(
    "path",
    [
        f"{BASE}/",  # the run's index
        f"{BASE}/validation/",  # a report
        f"{BASE}/validation/static/style.css",  # a file beside it
        f"{BASE}/validation/missing.html",  # a 404
        f"{BASE}/.hidden",  # a 400
        f"{BASE}/validation",  # a redirect
    ],
)
def test_every_answer_is_sandboxed_and_not_sniffed(viewer, path):
    from conveyor.reports.viewer import CONTENT_SECURITY_POLICY

    answer = viewer.get(path, follow_redirects=False)
    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["x-frame-options"] == "SAMEORIGIN"


def test_the_policy_lets_no_script_run_and_loads_nothing_remote():
    from conveyor.reports.viewer import CONTENT_SECURITY_POLICY

    directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in CONTENT_SECURITY_POLICY.split(";"))
    assert "allow-scripts" not in directives["sandbox"]  # a sandbox without scripts (and without forms, popups)
    assert directives["sandbox"].split() == ["allow-same-origin"]
    assert directives["default-src"] == "'none'"  # so no script-src: scripts are refused
    assert "script-src" not in directives
    assert all("http" not in value and "*" not in value for value in directives.values())
    assert directives["frame-ancestors"] == "'self'"


def test_a_report_with_a_script_is_served_as_it_is_under_the_policy(viewer, lake):
    folder = lake.reports("churn", RUN) / "evil"
    folder.mkdir()
    (folder / "index.html").write_text(EVIL_PAGE)
    page = viewer.get(f"{BASE}/evil/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "sandbox" in page.headers["content-security-policy"]


@pytest.mark.parametrize(
    "path",
    [
        f"{BASE}/..%2F..%2F..%2Fsecrets.txt",
        f"{BASE}/validation/..%2f..%2fgate/index.html",
        f"{BASE}/validation/%2e%2e%5c%2e%2e%5csecrets.txt",
        f"{BASE}/validation/..\\..\\secrets.txt",
        f"{BASE}/validation/%00index.html",
    ],
)
def test_paths_that_leave_the_run_folder_are_refused(viewer, lake, path):
    (lake.reports("churn", RUN).parent / "secrets.txt").write_text("THE OTHER RUN'S CONTENT")
    answer = viewer.get(path)
    assert answer.status_code == 400
    assert "segments must not start with '.'" in answer.json()["detail"]
    assert "OTHER RUN" not in answer.text


def test_an_absolute_path_stays_inside_the_run_folder(viewer):
    answer = viewer.get(f"{BASE}//etc/passwd")
    assert answer.status_code == 404
    assert "root:" not in answer.text


def test_run_index_escapes_the_run_id(viewer):
    from urllib.parse import quote

    run = 'manual__"><img src=x onerror=alert(1)>'
    viewer.session.runs.add(("churn__train", run))
    page = viewer.get(f"/reports/churn__train/{quote(run, safe='')}/")
    assert page.status_code == 200
    assert "<img" not in page.text
    assert "manual__&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text
