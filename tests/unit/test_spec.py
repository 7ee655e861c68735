"""The pipeline YAML model: valid files load, every broken rule names the file and the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conveyor.errors import SpecError
from conveyor.spec import PipelineSpec, load_spec, load_specs

PIPELINES = Path(__file__).resolve().parents[2] / "include" / "pipelines"


def write(folder: Path, name: str, document: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def churn() -> dict:
    return yaml.safe_load((PIPELINES / "churn.yaml").read_text())


def test_every_shipped_pipeline_is_valid():
    specs, errors = load_specs(PIPELINES)
    assert errors == {}
    assert "churn" in specs
    spec = specs["churn"]
    assert isinstance(spec, PipelineSpec)
    assert spec.data.label == "churned"
    assert spec.suite_name == "churn"
    assert (PIPELINES.parent / "expectations" / f"{spec.suite_name}.json").exists()


def test_defaults_cover_later_capabilities(tmp_path, churn):
    minimal = {k: churn[k] for k in ("name", "data", "trainer", "gate")}
    spec = load_spec(write(tmp_path, "churn", minimal))
    assert spec.approval == "auto" and spec.compute == "local" and spec.registry == "mlflow"
    assert spec.deploy.endpoint.enabled is False and spec.deploy.batch.enabled is False
    assert spec.ingest.schedule == "@hourly" and spec.data.marker == "_SUCCESS"
    assert "NN_TORCH" in spec.trainer.excluded_model_types


def test_typo_field_names_file_and_field(tmp_path, churn):
    churn["trainer"]["time_limt"] = 60
    path = write(tmp_path, "churn", churn)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value)
    assert "trainer.time_limt" in str(err.value)
    assert "Extra inputs are not permitted" in str(err.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["data"].update(format="xlsx"), "data.format"),
        (lambda d: d["trainer"].update(time_limit=-1), "trainer.time_limit"),
        (lambda d: d.update(approval="sometimes"), "approval"),
        (lambda d: d["data"].pop("label"), "data.label"),
        (lambda d: d["split"].update(test=0.9), "split.test"),
        (lambda d: d["data"]["csv"].update(delimiter=";;"), "data.csv.delimiter"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, churn, change, field):
    change(churn)
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_spec(write(tmp_path, "churn", churn))


def test_inconsistent_trainer_and_format(tmp_path, churn):
    churn["trainer"]["kind"] = "resnet"
    with pytest.raises(SpecError, match="resnet"):
        load_spec(write(tmp_path, "churn", churn))


def test_name_must_match_file(tmp_path, churn):
    with pytest.raises(SpecError, match="must match the file name"):
        load_spec(write(tmp_path, "other", churn))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    (tmp_path / "b.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "a.yaml")
    with pytest.raises(SpecError, match="YAML"):
        load_spec(tmp_path / "b.yaml")


def test_one_bad_file_does_not_stop_the_others(tmp_path, churn):
    shutil.copy(PIPELINES / "churn.yaml", tmp_path / "churn.yaml")
    broken = dict(churn, name="broken", gate={"metrik": "roc_auc"})
    write(tmp_path, "broken", broken)
    specs, errors = load_specs(tmp_path)
    assert list(specs) == ["churn"]
    assert list(errors) == [tmp_path / "broken.yaml"]
    assert "gate.metrik" in str(errors[tmp_path / "broken.yaml"])
