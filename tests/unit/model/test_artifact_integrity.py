"""Model archives are checked against the sha256 the registry recorded before anything is extracted,
and an endpoint caches extracted models by name and sha256 (issue 17 items 3 and 15)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.errors import ConveyorError, IntegrityError
from conveyor.model.artifacts import RegisteredArchive, archive_sha256, fetch, unpack
from conveyor.registry.base import SHA256_TAG
from helpers import context, pipeline_spec_dict


def make_archive(path: Path, marker: str) -> tuple[str, str]:
    """A small ``model.tar.gz`` (``metadata.json`` naming ``marker``, ``code/inference.py``); its URI and sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("metadata.json", json.dumps({"marker": marker})), ("code/inference.py", f"# {marker}\n")):
            info = tarfile.TarInfo(name)
            payload = text.encode()
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()


def marker_of(folder: Path) -> str:
    return json.loads((folder / "metadata.json").read_text())["marker"]


# --- fetch ------------------------------------------------------------------------------------------


def test_an_archive_with_the_recorded_sha256_is_extracted(tmp_path):
    uri, sha = make_archive(tmp_path / "lake" / "model.tar.gz", "A")
    assert archive_sha256(uri) == sha
    folder = fetch(uri, tmp_path / "out" / "model", registered=RegisteredArchive("churn", "3", sha.upper()))
    assert marker_of(folder) == "A" and (folder / "code" / "inference.py").is_file()


def test_an_archive_whose_bytes_differ_is_refused_before_anything_is_extracted(tmp_path):
    uri, recorded = make_archive(tmp_path / "lake" / "model.tar.gz", "A")
    _, actual = make_archive(tmp_path / "lake" / "model.tar.gz", "swapped")  # replaced after registration
    dest = tmp_path / "out" / "model"
    with pytest.raises(IntegrityError) as caught:
        fetch(uri, dest, registered=RegisteredArchive("churn", "3", recorded))
    error = caught.value
    assert (error.model, error.version, error.expected, error.actual, error.source) == (
        "churn",
        "3",
        recorded,
        actual,
        uri,
    )
    assert str(error) == (
        f"churn version 3: archive {uri} refused, not loaded: its sha256 is {actual}, the registry recorded {recorded}"
    )
    assert isinstance(error, ConveyorError) and not error.retryable
    assert list((tmp_path / "out").iterdir()) == []  # neither the copy nor an extracted folder


def test_a_version_registered_without_a_sha256_is_refused_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVEYOR_ALLOW_UNHASHED_MODELS", raising=False)
    uri, sha = make_archive(tmp_path / "lake" / "model.tar.gz", "old")
    with pytest.raises(IntegrityError, match="the registry recorded no sha256") as caught:
        fetch(uri, tmp_path / "out" / "model", registered=RegisteredArchive.of({"model_name": "churn", "version": "1"}))
    message = str(caught.value)
    assert caught.value.expected is None and caught.value.actual == sha
    assert "churn__train" in message and f"record {sha} as the version's 'model_sha256'" in message
    assert "CONVEYOR_ALLOW_UNHASHED_MODELS=true" in message
    assert not (tmp_path / "out" / "model").exists()


def test_unhashed_versions_load_with_a_warning_when_the_setting_allows(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CONVEYOR_ALLOW_UNHASHED_MODELS", "true")
    uri, sha = make_archive(tmp_path / "lake" / "model.tar.gz", "old")
    with caplog.at_level(logging.WARNING, logger="conveyor.model.artifacts"):
        folder = fetch(uri, tmp_path / "out" / "model", registered=RegisteredArchive("churn", "1", None))
    assert marker_of(folder) == "old"
    assert "churn version 1" in caplog.text and sha in caplog.text and "no recorded sha256" in caplog.text


def test_registered_archive_reads_registry_versions_and_resolve_results():
    version = SimpleNamespace(name="churn", version=4, tags={SHA256_TAG: "ab" * 32, "approval_status": "Approved"})
    assert RegisteredArchive.of(version) == RegisteredArchive("churn", "4", "ab" * 32)
    assert RegisteredArchive.of(SimpleNamespace(name="churn", version="5", tags={})).sha256 is None
    resolved = {"model_name": "churn", "version": "6", "model_uri": "file:///m.tar.gz", "sha256": "cd" * 32}
    assert RegisteredArchive.of(resolved) == RegisteredArchive("churn", "6", "cd" * 32)


def test_a_broken_archive_leaves_no_half_extracted_folder(tmp_path):
    good = tmp_path / "good.tar.gz"
    make_archive(good, "A")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(good.read_bytes()[:-40])  # truncated: the last member cannot be read
    dest = tmp_path / "cache" / "model"
    with pytest.raises((tarfile.TarError, EOFError, OSError)):
        unpack(broken, dest)
    assert list((tmp_path / "cache").iterdir()) == []  # no folder a cache would take for a complete model


# --- deploy: the check and the cache ------------------------------------------------------------------


@pytest.fixture
def endpoint(tmp_path, monkeypatch):
    """A deploy whose endpoint and registry are stand-ins: what it stages is recorded."""
    from conveyor.operators import deploy as deploy_module
    from conveyor.serving import endpoint_state as state

    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CONVEYOR_LAKE_URI", (tmp_path / "lake").as_uri())
    monkeypatch.delenv("CONVEYOR_LAKE_CONN_ID", raising=False)
    staged: list[tuple[str, Path]] = []
    registry = mock.Mock()
    registry.record_deployment.return_value = None
    monkeypatch.setattr(deploy_module.DeployEndpointOperator, "_endpoint", lambda self, spec, lake, name: "http://e")
    monkeypatch.setattr(state, "stage_candidate", lambda name, version, model_dir: staged.append((version, model_dir)))
    monkeypatch.setattr(state, "wait_for_workers", lambda *args, **kwargs: [])
    monkeypatch.setattr(state, "promote_candidate", lambda name: None)
    monkeypatch.setattr(deploy_module, "wait_for_model_dir", lambda *args, **kwargs: None)
    monkeypatch.setattr("conveyor.serving.smoke.smoke_test", lambda *args, **kwargs: {"rows": 1})
    monkeypatch.setattr("conveyor.registry.registry_hook", lambda spec, tracking_uri=None: registry)
    return SimpleNamespace(staged=staged, state=state, registry=registry, root=tmp_path)


def deploy(model: dict[str, Any]) -> dict[str, Any]:
    from conveyor.operators.deploy import DeployEndpointOperator

    op = DeployEndpointOperator(task_id="deploy", spec=pipeline_spec_dict("churn"), model=model)
    return op.execute(context("deploy-1"))


def resolved(uri: str, sha: str | None, version: str = "1") -> dict[str, Any]:
    return {"model_name": "churn", "version": version, "model_uri": uri, "train_run": "t", "sha256": sha}


def test_deploy_refuses_a_swapped_archive_and_stages_nothing(endpoint):
    uri, recorded = make_archive(endpoint.root / "lake" / "models" / "churn" / "r1" / "model.tar.gz", "A")
    make_archive(endpoint.root / "lake" / "models" / "churn" / "r1" / "model.tar.gz", "evil")
    with pytest.raises(AirflowFailException, match=f"churn version 1: archive {uri} refused") as caught:
        deploy(resolved(uri, recorded))
    assert isinstance(caught.value.__cause__, IntegrityError)
    assert endpoint.staged == [] and not endpoint.registry.record_deployment.called


def test_a_reset_registry_reusing_a_version_number_gets_its_own_model(endpoint):
    """Version 1 of a reset registry is another model: it is fetched and staged, not taken from the cache
    or reported as already live (the old cache was keyed by the version number alone)."""
    name = "churn"
    old_uri, old_sha = make_archive(endpoint.root / "lake" / "old" / "model.tar.gz", "old model")
    first = deploy(resolved(old_uri, old_sha))
    old_dir = endpoint.staged[-1][1]
    assert first["version"] == "1" and marker_of(Path(old_dir)) == "old model"
    assert Path(old_dir).name == f"churn-{old_sha}"
    endpoint.state.write_control(name, {"live": {"version": "1", "model_dir": str(old_dir)}, "candidate": None})

    new_uri, new_sha = make_archive(endpoint.root / "lake" / "new" / "model.tar.gz", "new model")
    result = deploy(resolved(new_uri, new_sha))
    assert len(endpoint.staged) == 2
    version, new_dir = endpoint.staged[-1]
    assert version == "1" and Path(new_dir) != Path(old_dir)
    assert marker_of(Path(new_dir)) == "new model" and marker_of(Path(old_dir)) == "old model"
    assert result["smoke"] == {"rows": 1}


def test_the_same_archive_again_is_taken_from_the_cache_and_reported_live(endpoint):
    uri, sha = make_archive(endpoint.root / "lake" / "m" / "model.tar.gz", "A")
    deploy(resolved(uri, sha))
    model_dir = endpoint.staged[-1][1]
    endpoint.state.write_control("churn", {"live": {"version": "1", "model_dir": str(model_dir)}, "candidate": None})
    again = deploy(resolved(uri, sha))
    assert len(endpoint.staged) == 1 and again["previous"] == "1"
    endpoint.registry.record_deployment.assert_called_with("churn", "1", "churn")


# --- the other loaders: the gate's champion and the monitor's captured-traffic models ---------------------


def champion_entry(uri: str, sha: str | None) -> SimpleNamespace:
    return SimpleNamespace(name="churn", version="2", source=uri, tags={SHA256_TAG: sha} if sha else {})


def gate_champion(entry: SimpleNamespace, tmp_path: Path, monkeypatch) -> tuple[Any, Any]:
    from conveyor.lake import Lake
    from conveyor.operators.gate import GateModelOperator
    from conveyor.spec import PipelineSpec

    registry = mock.Mock()
    registry.champion.return_value = entry
    monkeypatch.setattr("conveyor.registry.registry_hook", lambda spec, tracking_uri=None: registry)
    op = GateModelOperator(task_id="gate", spec=pipeline_spec_dict("churn"), model={}, evaluation={})
    spec = PipelineSpec.model_validate(pipeline_spec_dict("churn"))
    return op._champion(spec, Lake(root=(tmp_path / "lake").as_uri()), "run-1", tmp_path / "scratch")


def test_the_gate_never_runs_a_champion_whose_archive_changed(tmp_path, monkeypatch):
    uri, recorded = make_archive(tmp_path / "lake" / "champion" / "model.tar.gz", "champion")
    make_archive(tmp_path / "lake" / "champion" / "model.tar.gz", "evil")
    with pytest.raises(IntegrityError, match="churn version 2: archive .* refused"):
        gate_champion(champion_entry(uri, recorded), tmp_path, monkeypatch)
    assert not (tmp_path / "scratch" / "champion" / "model").exists()


def test_the_gate_judges_on_thresholds_when_the_champion_has_no_recorded_sha256(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVEYOR_ALLOW_UNHASHED_MODELS", raising=False)
    uri, _ = make_archive(tmp_path / "lake" / "champion" / "model.tar.gz", "champion")
    metrics, version = gate_champion(champion_entry(uri, None), tmp_path, monkeypatch)
    assert (metrics, version) == (None, "2")  # not re-scored: its code is not run, the new model is not blocked
    assert not (tmp_path / "scratch" / "champion" / "model").exists()


def test_the_monitor_refuses_to_load_a_changed_archive(tmp_path):
    from conveyor.lake import Lake
    from conveyor.monitoring.checks import ModelCache

    uri, recorded = make_archive(tmp_path / "lake" / "m" / "model.tar.gz", "A")
    make_archive(tmp_path / "lake" / "m" / "model.tar.gz", "evil")
    registry = mock.Mock()
    registry.version.return_value = champion_entry(uri, recorded)
    models = ModelCache(registry, "churn", Lake(root=(tmp_path / "lake").as_uri()), tmp_path / "scratch")
    with pytest.raises(IntegrityError, match="churn version 2"):
        models.loaded("2")
    assert not (tmp_path / "scratch" / "v2").exists()


# --- verified_metadata (the SageMaker batch: one read for the check and the metadata) ----------------


def test_verified_metadata_is_the_checked_archives_own(churn_model, tmp_path):
    from conveyor.model.artifacts import verified_metadata
    from conveyor.model.metadata import read

    archive = churn_model["archive"]
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    found = verified_metadata(archive.as_uri(), RegisteredArchive("churn", "3", sha))
    assert found.feature_names == read(churn_model["dir"]).feature_names and found.feature_names
    with pytest.raises(IntegrityError):
        verified_metadata(archive.as_uri(), RegisteredArchive("churn", "3", "0" * 64))


def test_verified_metadata_names_an_archive_that_is_not_a_model(tmp_path):
    from conveyor.model.artifacts import ArchiveMissing, verified_metadata
    from conveyor.model.metadata import MetadataError

    def checked(path: Path) -> RegisteredArchive:
        return RegisteredArchive("churn", "3", hashlib.sha256(path.read_bytes()).hexdigest())

    text = tmp_path / "notes.tar.gz"
    text.write_bytes(b"not a gzip stream at all")
    with pytest.raises(MetadataError, match="notes.tar.gz: not a model.tar.gz with a readable metadata.json"):
        verified_metadata(text.as_uri(), checked(text))
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        info = tarfile.TarInfo("code/inference.py")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(MetadataError, match="empty.tar.gz: no metadata.json inside it"):
        verified_metadata(empty.as_uri(), checked(empty))
    with pytest.raises(ArchiveMissing, match="no model archive at"):
        verified_metadata((tmp_path / "gone.tar.gz").as_uri(), RegisteredArchive("churn", "3", "0" * 64))
