"""Credentials in URLs never reach the screen, a log or an error: ``settings.mask_url`` and where it is used."""

from __future__ import annotations

import ast
import traceback
from pathlib import Path

import pytest

from conveyor.settings import mask_url

PASSWORD = "s3cret-Pa55"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"postgresql://conveyor:{PASSWORD}@db:5432/warehouse", "postgresql://***@db:5432/warehouse"),
        (f"postgresql+psycopg2://conveyor:{PASSWORD}@db/warehouse", "postgresql+psycopg2://***@db/warehouse"),
        (f"http://alice:{PASSWORD}@mlflow:5000", "http://***@mlflow:5000"),
        (f"https://alice:p@ss{PASSWORD}@mlflow.example/api?x=1", "https://***@mlflow.example/api?x=1"),
        ("https://token-only@mlflow.example/", "https://***@mlflow.example/"),
        (
            f"s3://bucket/key?X-Amz-Signature={PASSWORD}&X-Amz-Date=1",
            "s3://bucket/key?X-Amz-Signature=***&X-Amz-Date=1",
        ),
        (f"mysql://db/x?password={PASSWORD}&ssl=1", "mysql://db/x?password=***&ssl=1"),
        (f"http://h/?token={PASSWORD}", "http://h/?token=***"),
        (
            f"failed: API request to http://a:{PASSWORD}@h:5000/api/2.0 failed; retry http://b:{PASSWORD}@k/",
            "failed: API request to http://***@h:5000/api/2.0 failed; retry http://***@k/",
        ),
    ],
)
def test_mask_url_hides_credentials(url, masked):
    assert mask_url(url) == masked
    assert PASSWORD not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    ["sqlite:////tmp/state/mlflow.db", "file:///tmp/lake", "s3://bucket/prefix/landing", "http://127.0.0.1:8080/ping"],
)
def test_mask_url_leaves_urls_without_credentials_alone(url):
    assert mask_url(url) == url


def test_mlflow_errors_do_not_show_the_tracking_password(monkeypatch):
    from conveyor.registry.base import RegistryUnavailable
    from conveyor.registry.mlflow import MlflowRegistryHook

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    hook = MlflowRegistryHook(tracking_uri=f"http://alice:{PASSWORD}@127.0.0.1:9")
    with pytest.raises(RegistryUnavailable) as caught:
        hook.champion("churn")
    message = str(caught.value)
    assert "MLflow store at http://***@127.0.0.1:9" in message  # still says which store
    everything = "".join(traceback.format_exception(caught.value))  # what a task log shows
    assert PASSWORD not in everything
    assert "alice" not in everything


def test_the_demo_prints_the_warehouse_url_without_its_password(lake, monkeypatch, capsys, tmp_path):
    import sqlalchemy as sa

    import conveyor.batch.warehouse
    from conveyor import cli

    url = f"postgresql://conveyor:{PASSWORD}@db:5432/warehouse"
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE churn_predictions (run_id TEXT, model_version TEXT)"))
        conn.execute(sa.text("INSERT INTO churn_predictions VALUES ('manual__1', '1')"))
    connected: list[str] = []
    monkeypatch.setattr(cli, "run_dag", lambda *args, **kwargs: "success")
    monkeypatch.setattr(conveyor.batch.warehouse, "warehouse_url", lambda: url)
    monkeypatch.setattr(sa, "create_engine", lambda target, **kw: connected.append(target) or engine)
    cli.batch_demo("churn", 10)
    out = capsys.readouterr().out
    assert connected == [url]  # the demo still connects with the real URL
    assert "warehouse       : postgresql://***@db:5432/warehouse, table churn_predictions" in out
    assert PASSWORD not in out


def test_demo_output_and_failures_are_masked(capsys):
    from conveyor import cli

    cli.say(f"Writing into s3://k:{PASSWORD}@bucket/landing")
    cli.show(f"    MLflow store    : http://alice:{PASSWORD}@mlflow:5000")
    out = capsys.readouterr().out
    assert PASSWORD not in out
    assert "==> Writing into s3://***@bucket/landing" in out


def test_the_cli_prints_only_through_show():
    """Every ``print`` of the demo's command line goes through ``show`` (which masks)."""
    source = Path(__file__).resolve().parents[2] / "plugins" / "conveyor" / "cli.py"
    tree = ast.parse(source.read_text())
    show = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "show")
    inside = {id(node) for node in ast.walk(show)}
    prints = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and id(node) not in inside
    ]
    assert prints == []


def test_the_drop_writer_prints_its_uri_masked(monkeypatch, capsys):
    from conveyor import demo

    monkeypatch.setattr(demo, "write_drop", lambda *args, **kwargs: f"s3://key:{PASSWORD}@bucket/landing/churn/d1")
    demo.main(["drop", "--rows", "5"])
    out = capsys.readouterr().out
    assert out.strip() == "s3://***@bucket/landing/churn/d1"
