"""The MLflow registry hook against a real MLflow SQLite store: idempotency, approval status, champion alias."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from conveyor.errors import ConveyorError, IntegrityError, TransientError
from conveyor.model.artifacts import ArchiveMissing
from conveyor.registry.base import (
    APPROVED,
    CHAMPION,
    PENDING,
    REJECTED,
    RUN_TAG,
    SHA256_TAG,
    STATUS_TAG,
    RegistryUnavailable,
    UnknownApprovalStatus,
)
from conveyor.registry.mlflow import MlflowRegistryHook


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow SQLite store for the module (its first initialisation takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVEYOR_STATE_DIR", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        hook = MlflowRegistryHook(tracking_uri=f"sqlite:///{root}/mlflow.db")
        hook.experiment_id("warm-up")
        yield hook, root


ARCHIVES: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def archive_dir(tmp_path_factory):
    """Where :func:`archive` writes the module's model archives."""
    ARCHIVES[:] = [tmp_path_factory.mktemp("archives")]
    yield ARCHIVES[0]


def archive(name: str, content: bytes | None = None) -> str:
    """The URI of a model archive named ``name`` (its bytes ``model <name>`` unless given)."""
    path = ARCHIVES[0] / name / "model.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is not None or not path.exists():
        path.write_bytes(content if content is not None else f"model {name}".encode())
    return path.as_uri()


@pytest.fixture
def hook(store):
    return store[0]


@pytest.fixture
def model(request) -> str:
    """A registered-model name of this test's own, so tests sharing the store do not meet."""
    return "m_" + request.node.name.replace("[", "_").replace("]", "")[:60]


def new_run(hook: MlflowRegistryHook, key: str) -> str:
    return hook.ensure_run("churn", key, f"run {key}", {"pipeline": "churn"})


def versions_of(hook: MlflowRegistryHook, model_name: str) -> list:
    return hook.client.search_model_versions(f"name='{model_name}'")


def aliases(hook: MlflowRegistryHook, model_name: str) -> dict[str, str]:
    return {k: str(v) for k, v in hook.client.get_registered_model(model_name).aliases.items()}


def test_experiment_artifacts_live_in_the_state_folder(store):
    hook, root = store
    experiment = hook.client.get_experiment(hook.experiment_id("artifacts-here"))
    assert experiment.artifact_location == (root / "mlflow" / "artifacts" / "artifacts-here").as_uri()
    assert hook.experiment_id("artifacts-here") == experiment.experiment_id


def test_ensure_run_is_idempotent_by_run_key(hook):
    key = "manual__2026-01-01T00:00:00+00:00"
    first = hook.ensure_run("churn", key, "train churn", {"pipeline": "churn"})
    second = hook.ensure_run("churn", key, "train churn again", {"pipeline": "churn"})
    other = hook.ensure_run("churn", "scheduled__2026-01-02T00:00:00+00:00", "train churn", {})
    assert first == second != other
    run = hook.client.get_run(first)
    assert run.data.tags[RUN_TAG] == key and run.data.tags["pipeline"] == "churn"
    assert run.info.run_name == "train churn"
    experiment = hook.client.get_experiment_by_name("churn").experiment_id
    found = hook.client.search_runs([experiment], filter_string=f"tags.{RUN_TAG} = '{key}'")
    assert len(found) == 1


def test_log_run_twice_does_not_fail_and_logs_params_once(hook):
    run_id = new_run(hook, "log-twice")
    hook.log_run(
        run_id, {"presets": "medium_quality", "long": "x" * 7000}, {"roc_auc": 0.8, "note": "n/a"}, {"stage": "trained"}
    )
    hook.log_run(run_id, {"presets": "best_quality", "new": 1}, {"roc_auc": 0.8, "accuracy": 0.75}, {"stage": "gated"})
    data = hook.client.get_run(run_id).data
    assert data.params == {"presets": "medium_quality", "long": "x" * 6000, "new": "1"}
    assert data.metrics == {"roc_auc": 0.8, "accuracy": 0.75}
    assert data.tags["stage"] == "gated"
    assert len(hook.client.get_metric_history(run_id, "roc_auc")) == 1


def test_register_creates_a_pending_version_with_the_given_tags(hook, model):
    run_id = new_run(hook, f"register-{model}")
    version = hook.register(model, archive("run"), run_id, {"dataset_version": "v-1", "code_version": "abc"})
    assert str(version.version) == "1"
    assert version.run_id == run_id
    stored = hook.version(model, "1")
    assert stored.tags == {
        STATUS_TAG: PENDING,
        "dataset_version": "v-1",
        "code_version": "abc",
        SHA256_TAG: hashlib.sha256(b"model run").hexdigest(),
    }
    assert stored.source == archive("run")


def test_register_twice_for_the_same_run_returns_the_same_version(hook, model):
    run_id = new_run(hook, f"retry-{model}")
    first = hook.register(model, archive("m"), run_id, {"a": "1"})
    second = hook.register(model, archive("m"), run_id, {"a": "1"})
    assert str(first.version) == str(second.version) == "1"
    assert len(versions_of(hook, model)) == 1
    assert hook.find_version(model, run_id).version == first.version


def test_register_records_the_sha256_it_is_given_or_reads(hook, model):
    given = hashlib.sha256(b"elsewhere").hexdigest()
    read = hook.register(model, archive("sha-read"), new_run(hook, f"sr-{model}"), {})
    told = hook.register(model, archive("sha-told"), new_run(hook, f"st-{model}"), {}, sha256=given.upper())
    assert hook.version(model, read.version).tags[SHA256_TAG] == hashlib.sha256(b"model sha-read").hexdigest()
    assert hook.version(model, told.version).tags[SHA256_TAG] == given
    with pytest.raises(ConveyorError, match="'not-a-hash' is not a sha256"):
        hook.register(model, archive("sha-bad"), new_run(hook, f"sb-{model}"), {}, sha256="not-a-hash")
    assert len(versions_of(hook, model)) == 2


def test_register_refuses_an_archive_that_is_not_there(hook, model, tmp_path):
    missing = (tmp_path / "nothing" / "model.tar.gz").as_uri()
    with pytest.raises(ArchiveMissing, match=f"no model archive at {missing}"):
        hook.register(model, missing, new_run(hook, f"missing-{model}"), {})
    assert versions_of(hook, model) == []


def test_a_retry_naming_changed_bytes_is_refused(hook, model):
    run_id = new_run(hook, f"changed-{model}")
    first = hook.register(model, archive("changed", b"the model judged"), run_id, {})
    archive("changed", b"another model")
    with pytest.raises(IntegrityError) as caught:
        hook.register(model, archive("changed"), run_id, {})
    error = caught.value
    assert (error.model, error.version) == (model, str(first.version))
    assert (error.expected, error.actual) == (
        hashlib.sha256(b"the model judged").hexdigest(),
        hashlib.sha256(b"another model").hexdigest(),
    )
    assert str(error).startswith(f"{model} version 1: archive {archive('changed')} refused")
    assert not error.retryable and len(versions_of(hook, model)) == 1


def test_a_second_run_registers_the_next_version(hook, model):
    first = hook.register(model, archive("a"), new_run(hook, f"first-{model}"), {})
    second = hook.register(model, archive("b"), new_run(hook, f"second-{model}"), {})
    assert (str(first.version), str(second.version)) == ("1", "2")
    assert len(versions_of(hook, model)) == 2


def test_find_version_is_none_for_a_run_that_registered_nothing(hook, model):
    hook.register(model, archive("a"), new_run(hook, f"some-{model}"), {})
    assert hook.find_version(model, new_run(hook, f"other-{model}")) is None
    assert hook.find_version("m_never_registered", new_run(hook, f"other-{model}")) is None


def test_champion_is_none_before_any_promotion(hook, model):
    assert hook.champion("m_does_not_exist") is None
    hook.register(model, archive("a"), new_run(hook, f"c-{model}"), {})
    assert hook.champion(model) is None


def test_promote_approves_and_moves_the_champion_alias(hook, model):
    one = hook.register(model, archive("a"), new_run(hook, f"p1-{model}"), {})
    two = hook.register(model, archive("b"), new_run(hook, f"p2-{model}"), {})
    hook.promote(model, one.version)
    champion = hook.champion(model)
    assert str(champion.version) == str(one.version)
    assert champion.tags[STATUS_TAG] == APPROVED
    assert aliases(hook, model) == {CHAMPION: str(one.version)}

    hook.promote(model, two.version)
    assert str(hook.champion(model).version) == str(two.version)
    assert aliases(hook, model) == {CHAMPION: str(two.version)}
    assert hook.version(model, two.version).tags[STATUS_TAG] == APPROVED
    assert hook.version(model, one.version).tags[STATUS_TAG] == APPROVED


def test_promote_twice_is_harmless(hook, model):
    one = hook.register(model, archive("a"), new_run(hook, f"pp-{model}"), {})
    hook.promote(model, one.version)
    hook.promote(model, one.version)
    assert str(hook.champion(model).version) == str(one.version)


def test_set_status_rejects_and_tags(hook, model):
    one = hook.register(model, archive("a"), new_run(hook, f"s-{model}"), {})
    hook.set_status(model, one.version, REJECTED)
    hook.set_version_tags(model, one.version, {"approved_by": "ana", "deploy": False})
    tags = hook.version(model, one.version).tags
    assert tags[STATUS_TAG] == REJECTED and tags["approved_by"] == "ana" and tags["deploy"] == "False"
    assert hook.champion(model) is None


def test_set_status_refuses_an_unknown_status(hook, model):
    one = hook.register(model, archive("a"), new_run(hook, f"u-{model}"), {})
    with pytest.raises(ValueError, match="unknown approval status 'Approve'") as caught:
        hook.set_status(model, one.version, "Approve")
    assert isinstance(caught.value, UnknownApprovalStatus) and isinstance(caught.value, ConveyorError)
    assert hook.version(model, one.version).tags[STATUS_TAG] == PENDING


def test_an_unreachable_store_raises_registry_unavailable_naming_the_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    hook = MlflowRegistryHook(tracking_uri="http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=r"http://127\.0\.0\.1:9") as caught:
        hook.ensure_run("churn", "k", "n", {})
    assert "read experiment" in str(caught.value)
    assert isinstance(caught.value, TransientError) and caught.value.retryable  # the task is retried
    with pytest.raises(RegistryUnavailable, match=r"http://127\.0\.0\.1:9"):
        hook.champion("churn")
    with pytest.raises(RegistryUnavailable, match=r"http://127\.0\.0\.1:9"):
        hook.register("churn", archive("a"), "0" * 32, {})
    assert time.monotonic() - started < 20


def test_the_default_store_is_sqlite_in_the_state_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path))
    assert MlflowRegistryHook().tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert MlflowRegistryHook().tracking_uri == "http://mlflow:5000"
    assert MlflowRegistryHook("sqlite:////x.db").tracking_uri == "sqlite:////x.db"
    assert not Path(tmp_path / "mlflow").exists()
