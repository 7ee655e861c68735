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
        (lambda d: d["trainer"].update(refit_full="sometimes"), "trainer.refit_full"),
        (lambda d: d["data"].pop("label"), "data.label"),
        (lambda d: d["split"].update(test=0.9), "split.test"),
        (lambda d: d["data"]["csv"].update(delimiter=";;"), "data.csv.delimiter"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, churn, change, field):
    change(churn)
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_spec(write(tmp_path, "churn", churn))


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (True, True), (False, False), (None, "auto")])
def test_refit_full_is_auto_by_default_or_a_boolean(tmp_path, churn, value, expected):
    if value is None:
        churn["trainer"].pop("refit_full", None)
    else:
        churn["trainer"]["refit_full"] = value
    assert load_spec(write(tmp_path, "churn", churn)).trainer.refit_full == expected


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


# --- issue 17 item 19: what can be checked at parse time is checked there, naming the file and the field


def test_time_limit_zero_is_refused_at_parse_time(tmp_path, churn):
    """0 passed the old rule (>= 0), then Airflow refused the train DAG's Param (minimum 1) at construction."""
    churn["trainer"]["time_limit"] = 0
    path = write(tmp_path, "churn", churn)
    with pytest.raises(SpecError, match=r"field 'trainer\.time_limit'") as err:
        load_spec(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        (lambda d: d["ingest"], "ingest.schedule"),
        (lambda d: d["retrain"], "retrain.schedule"),
        (lambda d: d["deploy"]["batch"], "deploy.batch.schedule"),
        (lambda d: d["monitor"], "monitor.schedule"),
    ],
)
@pytest.mark.parametrize("cron", ["every hour", "61 * * * *", "@fortnightly", "* * *"])
def test_invalid_cron_names_the_field(tmp_path, churn, section, field, cron):
    section(churn)["schedule"] = cron
    path = write(tmp_path, "churn", churn)
    with pytest.raises(SpecError, match=rf"field '{field}'") as err:
        load_spec(path)
    assert str(path) in str(err.value) and cron in str(err.value)


@pytest.mark.parametrize("cron", ["@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "0 3 * * 1-5"])
def test_valid_crons_and_presets_are_accepted(tmp_path, churn, cron):
    churn["ingest"]["schedule"] = churn["retrain"]["schedule"] = churn["monitor"]["schedule"] = cron
    churn["deploy"]["batch"]["schedule"] = cron
    spec = load_spec(write(tmp_path, "churn", churn))
    assert spec.ingest.schedule == spec.retrain.schedule == cron


def test_once_and_continuous_are_ingest_schedules_only(tmp_path, churn):
    churn["ingest"]["schedule"] = "@continuous"
    assert load_spec(write(tmp_path, "churn", churn)).ingest.schedule == "@continuous"
    churn["retrain"]["schedule"] = "@once"  # a time trigger of the train DAG: a cron or a preset
    with pytest.raises(SpecError, match=r"field 'retrain\.schedule'"):
        load_spec(write(tmp_path, "churn", churn))


@pytest.mark.parametrize(
    ("change", "field", "word"),
    [
        (lambda d: d["gate"].update(metric="acuracy", thresholds={}), "gate.metric", "acuracy"),
        (lambda d: d["gate"].update(thresholds={"roc_auc": 0.7, "f1_macro": 0.5}), "gate.thresholds", "f1_macro"),
        (lambda d: d["monitor"].update(metric="rmse"), "monitor.metric", "rmse"),
    ],
)
def test_a_metric_the_problem_type_never_computes_is_refused(tmp_path, churn, change, field, word):
    change(churn)
    with pytest.raises(SpecError, match=rf"field '{field}'") as err:
        load_spec(write(tmp_path, "churn", churn))
    assert word in str(err.value) and "binary" in str(err.value) and "balanced_accuracy" in str(err.value)


def test_roc_auc_is_no_regression_metric(tmp_path, churn):
    churn["data"]["problem_type"] = "regression"
    churn["trainer"]["eval_metric"] = None
    churn["gate"] = {"metric": "roc_auc"}
    with pytest.raises(SpecError, match=r"field 'gate\.metric': .*'roc_auc'.*regression.*rmse"):
        load_spec(write(tmp_path, "churn", churn))
    churn["gate"] = {"metric": "rmse", "thresholds": {"rmse": 3.0, "r2": 0.5}}
    churn["monitor"]["metric"] = "mae"
    assert load_spec(write(tmp_path, "churn", churn)).gate.metric == "rmse"


def test_declared_metrics_are_exactly_what_compute_metrics_returns():
    """The spec's check reads metrics.METRICS_BY_PROBLEM_TYPE: it must be what the evaluation computes."""
    import numpy as np

    from conveyor.model.metrics import COUNT_KEYS, HIGHER_IS_BETTER, METRICS_BY_PROBLEM_TYPE, compute_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 6, 300))
    proba = rng.dirichlet(np.ones(6), 300)
    cases = {
        "binary": (y % 2, pred % 2, proba[:, 0], None),
        "multiclass": (y % 3, pred % 3, proba[:, :3] / proba[:, :3].sum(axis=1, keepdims=True), [0, 1, 2]),
        "image_classification": (y, pred, proba, list(range(6))),
        "regression": (y + 1.0, pred + 1.5, None, None),
    }
    for problem_type, (truth, predicted, probabilities, labels) in cases.items():
        metrics = compute_metrics(problem_type, truth, predicted, probabilities, class_labels=labels)
        computed = {k for k, v in metrics.items() if isinstance(v, float) and k not in COUNT_KEYS}
        assert computed == set(METRICS_BY_PROBLEM_TYPE[problem_type]), problem_type
        assert computed <= set(HIGHER_IS_BETTER)


def test_a_pipeline_without_its_expectation_suite_is_refused(tmp_path, churn):
    churn["expectations"] = "churn_v9"
    path = write(tmp_path, "churn", churn)
    with pytest.raises(SpecError, match=r"field 'expectations': .*churn_v9\.json") as err:
        load_spec(path)
    assert str(path) in str(err.value)
    other = dict(churn, name="fraud")
    other.pop("expectations")  # the default suite is the pipeline's name: include/expectations/fraud.json
    with pytest.raises(SpecError, match=r"field 'expectations': .*fraud\.json"):
        load_spec(write(tmp_path, "fraud", other))


def test_a_pipeline_saved_as_yml_loads_and_get_spec_finds_it(tmp_path, monkeypatch, churn):
    include = tmp_path / "include"
    shutil.copytree(PIPELINES.parent / "expectations", include / "expectations")
    (include / "pipelines").mkdir()
    (include / "pipelines" / "churn.yml").write_text(yaml.safe_dump(churn))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    specs, errors = load_specs(include / "pipelines")
    assert errors == {} and list(specs) == ["churn"]
    assert specs["churn"].source == include / "pipelines" / "churn.yml"
    from conveyor.spec import get_spec

    assert get_spec("churn") == specs["churn"]
    assert get_spec("churn").source == include / "pipelines" / "churn.yml"


def test_the_same_pipeline_as_yaml_and_yml_refuses_the_yml(tmp_path, churn):
    write(tmp_path, "churn", churn)
    (tmp_path / "churn.yml").write_text(yaml.safe_dump(churn))
    specs, errors = load_specs(tmp_path)
    assert list(specs) == ["churn"] and specs["churn"].source == tmp_path / "churn.yaml"
    assert list(errors) == [tmp_path / "churn.yml"]
    assert "churn.yaml" in str(errors[tmp_path / "churn.yml"])


def test_a_file_that_is_not_yaml_or_yml_is_not_a_pipeline(tmp_path, churn):
    write(tmp_path, "churn", churn)
    (tmp_path / "notes.yhtml").write_text("<p>not a pipeline</p>")
    (tmp_path / "churn.yaml.bak").write_text("name: [")
    specs, errors = load_specs(tmp_path)
    assert list(specs) == ["churn"] and errors == {}


def test_a_duplicated_key_is_refused_naming_key_and_line(tmp_path):
    text = (PIPELINES / "churn.yaml").read_text()
    path = tmp_path / "churn.yaml"
    path.write_text(text + "\napproval: manual\n")  # churn.yaml already says approval: auto
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    first = next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith("approval:"))
    assert str(path) in message and "'approval'" in message
    assert f"line {len(text.splitlines()) + 2}" in message and f"line {first}" in message


def test_a_duplicated_nested_key_is_refused(tmp_path):
    text = (PIPELINES / "churn.yaml").read_text().replace("  time_limit: 120\n", "  time_limit: 120\n  time_limit: 5\n")
    path = tmp_path / "churn.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"'time_limit'.*line \d+"):
        load_spec(path)


def test_yaml_merge_keys_still_work(tmp_path):
    """A merged key that an explicit key overrides is YAML's own rule, not a duplicate."""
    text = (PIPELINES / "churn.yaml").read_text()
    split = next(line for line in text.splitlines() if line.startswith("split:"))
    path = tmp_path / "churn.yaml"
    path.write_text(text.replace(split, "split: {<<: {validation: 0.2, test: 0.2, seed: 1}, test: 0.1}"))
    spec = load_spec(path)
    assert (spec.split.validation, spec.split.test, spec.split.seed) == (0.2, 0.1, 1)


def endpoint_pipeline(folder: Path, churn: dict, pipeline: str, **endpoint) -> Path:
    """A copy of churn named ``pipeline`` (churn's suite) with endpoint settings changed."""
    document = dict(churn, name=pipeline, expectations="churn")
    document["deploy"] = {**churn["deploy"], "endpoint": {**churn["deploy"]["endpoint"], **endpoint}}
    return write(folder, pipeline, document)


def test_a_copy_claiming_churns_endpoint_name_is_refused_and_churn_loads(tmp_path, churn):
    """Observed: a copy of churn with a new name but endpoint churn deployed over churn's endpoint."""
    own = write(tmp_path, "churn", churn)
    copy = endpoint_pipeline(tmp_path, churn, "churn_v2")  # endpoint name churn, port 8090: as copied
    specs, errors = load_specs(tmp_path)
    assert list(specs) == ["churn"] and list(errors) == [copy]
    message = str(errors[copy])
    assert "field 'deploy.endpoint.name'" in message and "'churn'" in message and str(own) in message


def test_two_pipelines_on_one_port_are_both_refused_and_others_load(tmp_path, churn):
    a = endpoint_pipeline(tmp_path, churn, "alpha", name="alpha", port=8095)
    b = endpoint_pipeline(tmp_path, churn, "beta", name="beta", port=8095)
    write(tmp_path, "churn", churn)
    specs, errors = load_specs(tmp_path)
    assert list(specs) == ["churn"] and set(errors) == {a, b}
    for mine, other in ((a, b), (b, a)):
        message = str(errors[mine])
        assert "field 'deploy.endpoint.port'" in message and "8095" in message and str(other) in message


def test_two_pipelines_on_an_unowned_endpoint_name_are_both_refused(tmp_path, churn):
    a = endpoint_pipeline(tmp_path, churn, "alpha", name="shared", port=8095)
    b = endpoint_pipeline(tmp_path, churn, "beta", name="shared", port=8096)
    specs, errors = load_specs(tmp_path)
    assert specs == {} and set(errors) == {a, b}
    assert "'shared'" in str(errors[a]) and str(b) in str(errors[a])


def test_disabled_endpoints_claim_nothing(tmp_path, churn):
    write(tmp_path, "churn", churn)
    endpoint_pipeline(tmp_path, churn, "churn_v2", enabled=False)  # same name and port, never deployed
    specs, errors = load_specs(tmp_path)
    assert errors == {} and set(specs) == {"churn", "churn_v2"}


def test_absurdly_nested_yaml_is_that_files_error_only(tmp_path, churn):
    write(tmp_path, "churn", churn)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")  # PyYAML recurses: RecursionError
    specs, errors = load_specs(tmp_path)
    assert list(specs) == ["churn"] and list(errors) == [deep]
    assert "RecursionError" in str(errors[deep]) and str(deep) in str(errors[deep])
