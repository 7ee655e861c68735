"""The pipeline file's ``tuning:`` block: valid blocks load, every broken rule names its field and the rule,
and the tables of tunable hyperparameters and metrics match the training scripts and AutoGluon."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from conveyor.errors import SpecError
from conveyor.spec import load_spec
from conveyor.training import tuning_spec
from scripts import load_script

PIPELINES = Path(__file__).resolve().parents[3] / "include" / "pipelines"
RESNET_SPACE = {
    "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adamw"]},
    "epochs": {"type": "int", "low": 2, "high": 6},
}


def pipeline(name: str, tuning: dict | None, **changes: dict) -> dict:
    document = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())
    for section, values in changes.items():
        document[section] = {**document.get(section, {}), **values}
    if tuning is not None:
        document["tuning"] = tuning
    return document


def load(tmp_path: Path, document: dict) -> object:
    path = tmp_path / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document))
    expectations = PIPELINES.parent / "expectations"
    assert (expectations / f"{document['name']}.json").exists()
    return load_spec(path)


def shapes(**tuning: object) -> dict:
    document = pipeline("shapes", {"metric": "balanced_accuracy", "trials": 4, "budget": 120, **tuning})
    for name in ("lr", "optimizer", "epochs"):
        document["trainer"]["hyperparameters"].pop(name, None)
    document["tuning"].setdefault("search_space", copy.deepcopy(RESNET_SPACE))
    return document


def test_a_valid_block_loads_with_its_defaults(tmp_path):
    spec = load(tmp_path, shapes(parallel=2))
    assert spec.tuning.goal == "maximize"
    assert spec.tuning.trial_seconds(120) == 60  # 120 s x 2 at a time / 4 trials
    assert spec.tuning.search_space["lr"].log is True
    churn = load(
        tmp_path,
        pipeline(
            "churn",
            {
                "metric": "roc_auc",
                "trials": 2,
                "search_space": {"GBM.num_leaves": {"type": "int", "low": 8, "high": 64}},
            },
        ),
    )
    assert churn.tuning.budget is None and churn.tuning.trial_seconds(churn.trainer.time_limit) == 60


def test_no_block_is_no_tuning():
    assert load_spec(PIPELINES / "churn.yaml").tuning is None


@pytest.mark.parametrize(
    ("space", "field", "rule"),
    [
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "tuning.search_space.lr", "low < high"),
        ({"lr": {"type": "float", "low": 0.0, "high": 1, "log": True}}, "tuning.search_space.lr", "low > 0 on a log"),
        (
            {"lr": {"type": "float", "low": 0.1, "high": 1, "log": True, "step": 0.1}},
            "search_space.lr",
            "either log or step",
        ),
        ({"lr": {"type": "normal", "mean": 0}}, "tuning.search_space.lr", "does not match any of the expected tags"),
        ({"optimizer": {"type": "categorical", "choices": []}}, "tuning.search_space.optimizer", "at least 1 item"),
        (
            {"optimizer": {"type": "categorical", "choices": ["sgd", "sgd"]}},
            "search_space.optimizer",
            "each choice once",
        ),
        (
            {"dropout": {"type": "float", "low": 0, "high": 0.5}},
            "tuning.search_space.dropout",
            "unknown hyperparameter",
        ),
        ({"epochs": {"type": "float", "low": 1, "high": 5}}, "tuning.search_space.epochs", "rule 'type: int'"),
        ({"lr": {"type": "float", "low": -1, "high": 1}}, "tuning.search_space.lr", "rule 'lr > 0.0'"),
        ({"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]}}, "search_space.optimizer", "['adam']"),
        ({"optimizer": {"type": "int", "low": 1, "high": 2}}, "tuning.search_space.optimizer", "type: categorical"),
    ],
)
def test_bad_distributions_and_hyperparameters_name_the_field(tmp_path, space, field, rule):
    with pytest.raises(SpecError) as raised:
        load(tmp_path, shapes(search_space=space))
    message = str(raised.value)
    assert field in message and rule in message, message


@pytest.mark.parametrize(
    ("tuning", "field", "rule"),
    [
        ({"trials": 0}, "tuning.trials", "greater than or equal to 1"),
        ({"parallel": 5}, "tuning", "rule 'parallel <= trials'"),
        ({"budget": 20}, "tuning.budget", "rule 'budget x parallel / trials >= 10s'"),
        ({"budget": 0}, "tuning.budget", "greater than or equal to 1"),
        ({"direction": "minimize"}, "tuning", "the metric's own direction"),
        ({"metric": "roc_auc"}, "tuning.metric", "not a validation metric of the resnet trainer"),
        ({"strategy": "grid"}, "tuning.strategy", "'tpe' or 'random'"),
        ({"search_space": {}}, "tuning.search_space", "at least 1 item"),
        ({"samples": 3}, "tuning.samples", "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_name_the_field_and_the_rule(tmp_path, tuning, field, rule):
    with pytest.raises(SpecError) as raised:
        load(tmp_path, shapes(**tuning))
    message = str(raised.value)
    assert f"field '{field}'" in message and rule in message, message


def test_a_hyperparameter_is_fixed_or_tuned(tmp_path):
    document = shapes()
    document["trainer"]["hyperparameters"]["lr"] = 0.01
    with pytest.raises(SpecError, match=r"field 'tuning.search_space': lr also set in trainer.hyperparameters"):
        load(tmp_path, document)
    document = shapes(search_space={"batch-size": {"type": "categorical", "choices": [8, 16]}})  # batch-size is fixed
    with pytest.raises(SpecError, match="batch_size also set"):
        load(tmp_path, document)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("GBM.leaves", "unknown hyperparameter of AutoGluon's GBM"),
        ("learning_rate", "'<model>.<parameter>'"),
        ("NN_TORCH.dropout_prob", "'<model>.<parameter>'"),
    ],
)
def test_autogluon_hyperparameters_are_model_parameters(tmp_path, name, rule):
    document = pipeline(
        "churn", {"metric": "roc_auc", "trials": 2, "search_space": {name: {"type": "int", "low": 2, "high": 9}}}
    )
    with pytest.raises(SpecError) as raised:
        load(tmp_path, document)
    assert f"field 'tuning.search_space.{name}'" in str(raised.value) and rule in str(raised.value)


def test_autogluon_excluded_models_and_metric_conflicts_are_refused(tmp_path):
    space = {"CAT.depth": {"type": "int", "low": 4, "high": 8}}
    document = pipeline(
        "churn", {"metric": "roc_auc", "search_space": space}, trainer={"excluded_model_types": ["CAT"]}
    )
    with pytest.raises(SpecError, match="model CAT is in trainer.excluded_model_types"):
        load(tmp_path, document)
    document = pipeline("churn", {"metric": "accuracy", "search_space": space})  # churn's eval_metric is roc_auc
    with pytest.raises(SpecError, match="rule 'trials are ranked by the metric they are fit for'"):
        load(tmp_path, document)
    document = pipeline("churn", {"metric": "rmse", "search_space": space}, trainer={"eval_metric": None})
    with pytest.raises(SpecError, match="'rmse' is not a validation metric of the autogluon trainer for binary"):
        load(tmp_path, document)


def test_sagemaker_trials_must_fit_max_run(tmp_path):
    document = shapes(budget=4000, trials=2)
    document["compute"] = "sagemaker"
    document["sagemaker"] = {"role_arn": "arn:aws:iam::123456789012:role/sm", "max_run_seconds": 1800}
    with pytest.raises(
        SpecError, match=r"field 'tuning.budget': 2000s per trial: rule 'below sagemaker.max_run_seconds'"
    ):
        load(tmp_path, document)


@pytest.mark.slow  # imports torch (the script's modules)
def test_the_resnet_table_matches_the_scripts_own_flags():
    parser = load_script("include/training/resnet_image/arguments.py", "resnet_image_arguments").get_args_parser()
    actions = {action.dest: action for action in parser._actions}
    for name, (kind, rule) in tuning_spec.RESNET_HYPERPARAMETERS.items():
        assert name in actions, f"{name} is no flag of the resnet script"
        action = actions[name]
        if kind == "choice" and action.choices is not None:
            assert set(rule) <= set(action.choices), name  # every value the block accepts, the script takes
        elif kind in ("int", "positive", "float"):
            with pytest.raises(SystemExit):  # a value below the table's minimum is one the script refuses too
                parser.parse_args([f"--{name.replace('_', '-')}", str(rule - 1 if kind == "int" else -0.5)])
    assert set(tuning_spec.RESNET_METRICS) == set(actions["gate_metric"].choices)


@pytest.mark.slow  # imports AutoGluon
def test_the_autogluon_metrics_are_autogluons():
    from autogluon.core.metrics import METRICS

    for problem_type, names in tuning_spec.AUTOGLUON_METRICS.items():
        assert set(names) <= set(METRICS[problem_type]), problem_type
        for name in names:  # the natural direction the block assumes is AutoGluon's too
            assert (name in tuning_spec.LOWER_IS_BETTER) == (not METRICS[problem_type][name].greater_is_better_internal)
