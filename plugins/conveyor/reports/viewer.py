"""Conveyor's report viewer: the reports of a run, read from the lake, behind Airflow's login.

Mounted in the Airflow API server by the ``conveyor`` plugin (``plugins/conveyor_plugin.py``) at
``/conveyor``; the tasks' extra links (``conveyor.links``) point here.

``GET /conveyor/reports/<dag_id>/<run_id>/`` lists the run's reports, and
``GET /conveyor/reports/<dag_id>/<run_id>/<section>/<file>`` serves a report's files
(``<section>/`` serves its ``index.html``). The person must be logged in to Airflow (its session
cookie or a bearer token) and allowed to read that DAG's task instances; a browser that is not
logged in is sent to the login page and back. Reports are read through ``ObjectStoragePath``, so
a local lake and S3 are served the same way.
"""

from __future__ import annotations

import html
import mimetypes
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

CHUNK_BYTES = 1 << 20
SECTION_TITLES = {
    "validation": "Data validation",
    "evaluation": "Evaluation",
    "gate": "Gate decision",
    "batch": "Batch predictions",
    "monitor": "Monitoring (drift, live accuracy)",
}

# Every answer of the viewer, pages and files alike. A report shows data from drops and models, so its
# content is never trusted: no script runs (``sandbox`` without ``allow-scripts``, no ``script-src``), it
# loads nothing from outside Airflow's origin, submits no form and is framed by Airflow's pages only.
# ``allow-same-origin`` keeps the origin so the report's own images and stylesheet are fetched with the
# Airflow session cookie (SameSite=Lax); without scripts the page cannot use that origin.
CONTENT_SECURITY_POLICY = (
    "sandbox allow-same-origin; default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "SAMEORIGIN",
    "Cross-Origin-Resource-Policy": "same-origin",
}

app = FastAPI(title="Conveyor reports", description="Reports of Conveyor's pipeline runs, read from the lake.")


@app.middleware("http")
async def security_headers(request: Request, call_next: Any) -> Response:
    """Every answer (report, file, index, redirect, error) carries :data:`SECURITY_HEADERS`."""
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def pipeline_of(dag_id: str) -> str:
    """The pipeline a Conveyor DAG belongs to (``churn__train`` -> ``churn``).

    :param dag_id: a DAG id of the form ``<pipeline>__<kind>``.
    """
    pipeline, sep, kind = dag_id.rpartition("__")
    if not sep or not pipeline or not kind:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {dag_id!r} is not a Conveyor pipeline DAG")
    return pipeline


def safe_parts(path: str) -> list[str]:
    """The segments of a report path, refusing any that could leave the run's report folder.

    :param path: the path below the run's report folder, as the request gave it.
    """
    parts = [part for part in path.split("/") if part]
    for part in parts:
        if part.startswith(".") or "\\" in part or "\x00" in part:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, f"report path {path!r}: segments must not start with '.' or contain '\\'"
            )
    return parts


def run_reports(session: Any, dag_id: str, run_id: str) -> Any:
    """The lake folder of a run's reports, after checking the run exists.

    :param session: a metadata database session.
    :param dag_id: the run's DAG.
    :param run_id: the run.
    """
    from airflow.models import DagRun
    from sqlalchemy import select

    from conveyor.lake import Lake

    pipeline = pipeline_of(dag_id)
    if session.scalar(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {dag_id!r} has no run {run_id!r}")
    return Lake.from_env().reports(pipeline, run_id)


def read_chunks(path: Any) -> Iterator[bytes]:
    """The bytes of a lake file, a chunk at a time."""
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def index_page(dag_id: str, run_id: str, folder: Any) -> HTMLResponse:
    """A page listing the reports a run wrote (the sections that have an ``index.html``)."""
    sections = (
        sorted(item.name for item in folder.iterdir() if (item / "index.html").exists()) if folder.exists() else []
    )
    items = (
        "".join(
            f'<li><a href="{html.escape(quote(name))}/">{html.escape(SECTION_TITLES.get(name, name))}</a></li>'
            for name in sections
        )
        or "<li>This run wrote no report yet.</li>"
    )
    title = f"Reports of {html.escape(dag_id)} / {html.escape(run_id)}"
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title}</h1><ul>{items}</ul></body></html>"
    )


@app.get(
    "/reports/{dag_id}/{run_id}/{path:path}",
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE))],
    response_class=Response,
)
def report_file(dag_id: str, run_id: str, path: str, session: SessionDep) -> Response:
    """A run's report index, a report (a folder's ``index.html``), or a file a report refers to."""
    parts = safe_parts(path)
    folder = run_reports(session, dag_id, run_id)
    if not parts:
        return index_page(dag_id, run_id, folder)
    target = folder.joinpath(*parts)
    if target.is_dir():
        if not path.endswith("/"):  # so the report's relative links resolve inside its folder
            return RedirectResponse(
                quote(parts[-1]) + "/", status.HTTP_307_TEMPORARY_REDIRECT
            )  # relative: keeps the quoting
        target = target / "index.html"
    if not target.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id!r} of {dag_id!r} has no report file {path!r}")
    media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return StreamingResponse(
        read_chunks(target),
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@app.exception_handler(HTTPException)
async def login_first(request: Request, exc: HTTPException) -> Response:
    """A browser that is not logged in goes to Airflow's login page, then back to the report."""
    if exc.status_code == status.HTTP_401_UNAUTHORIZED and "text/html" in request.headers.get("accept", ""):
        from airflow.api_fastapi.app import get_auth_manager

        raw_path = request.scope.get("raw_path")  # as sent: the run id keeps its quoting
        here = str(request.url.replace(path=raw_path.decode("latin-1"))) if raw_path else str(request.url)
        return RedirectResponse(get_auth_manager().get_url_login(next_url=here), status.HTTP_303_SEE_OTHER)
    return await http_exception_handler(request, exc)
