"""The train/validation/test split: determinism, stratification, storage, bad input, and the split operator."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.data.splits import PARTS, SplitError, check_splittable, read_part, split_frame, write_split
from conveyor.demo import churn_frame
from conveyor.spec import get_spec
from helpers import churn_csv, context, ingest_and_validate, pipeline_spec_dict, write_drop

VERSION = "v-test0000000000000000"


@pytest.fixture(scope="module")
def spec():
    return get_spec("churn")


def with_split(spec, **changes):
    """The spec with some split settings changed (the spec is frozen)."""
    return spec.model_copy(update={"split": spec.split.model_copy(update=changes)})


@pytest.fixture(scope="module")
def frame():
    return churn_frame(1000, seed=7)


def ids(part: pd.DataFrame) -> list[str]:
    return list(part["customer_id"])


# --- split_frame -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_parts(spec, frame):
    first, second = split_frame(frame, spec), split_frame(frame.copy(), spec)
    assert set(first) == set(PARTS)
    for name in PARTS:
        pd.testing.assert_frame_equal(first[name], second[name])


def test_different_seed_gives_different_parts(spec, frame):
    first = split_frame(frame, spec)
    other = split_frame(frame, with_split(spec, seed=spec.split.seed + 1))
    for name in PARTS:
        assert len(first[name]) == len(other[name])
        assert sorted(ids(first[name])) != sorted(ids(other[name]))


def test_parts_are_disjoint_and_cover_every_row(spec, frame):
    parts = split_frame(frame, spec)
    everything = [cid for name in PARTS for cid in ids(parts[name])]
    assert len(everything) == len(set(everything)) == len(frame)


def test_shares_are_respected(spec, frame):
    spec = with_split(spec, validation=0.2, test=0.1)
    parts = split_frame(frame, spec)
    assert len(parts["validation"]) == pytest.approx(200, abs=2)
    assert len(parts["test"]) == pytest.approx(100, abs=2)
    assert len(parts["train"]) == pytest.approx(700, abs=2)


def test_stratified_parts_keep_the_class_shares(spec, frame):
    overall = frame["churned"].value_counts(normalize=True)
    parts = split_frame(frame, spec)
    for name in PARTS:
        shares = parts[name]["churned"].value_counts(normalize=True)
        for label, share in overall.items():
            assert abs(shares[label] - share) < 0.02, (name, label, shares[label], share)


def test_rows_with_a_missing_label_are_dropped(spec, frame):
    holey = frame.copy()
    holey.loc[holey.index[::10], "churned"] = None
    parts = split_frame(holey, spec)
    kept = pd.concat([parts[name] for name in PARTS])
    assert len(kept) == holey["churned"].notna().sum() == 900
    assert kept["churned"].notna().all()
    assert not set(kept["customer_id"]) & set(holey.loc[holey.index[::10], "customer_id"])


# --- write_split / read_part -----------------------------------------------------------------------


def test_write_split_stores_the_parts_and_a_record(lake, spec):
    frame = churn_frame(300, seed=3)
    record = write_split(lake, spec, VERSION, "manual__2026-01-01T00:00:00+00:00", frame)
    root = lake.models("churn", "manual__2026-01-01T00:00:00+00:00") / "split"
    assert record["uri"] == str(root)
    for name in PARTS:
        assert (root / name / "data.parquet").exists()
    stored = json.loads((root / "split.json").read_text())
    assert stored == json.loads(json.dumps(record))
    assert stored["dataset_version"] == VERSION and stored["pipeline"] == "churn"
    assert stored["seed"] == spec.split.seed and stored["stratified"] is True
    assert stored["shares"] == {"validation": spec.split.validation, "test": spec.split.test}
    assert sum(stored["parts"][name]["rows"] for name in PARTS) == 300
    expected = split_frame(frame, spec)
    for name in PARTS:
        back = read_part(lake, "churn", "manual__2026-01-01T00:00:00+00:00", name)
        pd.testing.assert_frame_equal(back, expected[name].reset_index(drop=True), check_dtype=False)
        assert stored["parts"][name]["rows"] == len(back)
        assert stored["parts"][name]["classes"] == {
            str(k): int(v) for k, v in back["churned"].value_counts().sort_index().items()
        }


def test_write_split_twice_writes_the_same_parts(lake, spec):
    frame = churn_frame(200, seed=4)
    first = write_split(lake, spec, VERSION, "run1", frame)
    before = {name: read_part(lake, "churn", "run1", name) for name in PARTS}
    second = write_split(lake, spec, VERSION, "run1", frame)
    assert first == second
    for name in PARTS:
        pd.testing.assert_frame_equal(before[name], read_part(lake, "churn", "run1", name))


# --- bad input -------------------------------------------------------------------------------------


def test_a_single_class_label_is_refused(lake, spec):
    frame = churn_frame(200)
    frame["churned"] = "no"
    with pytest.raises(SplitError, match="at least 2 classes") as caught:
        write_split(lake, spec, VERSION, "run1", frame)
    assert VERSION in str(caught.value) and "'no'" in str(caught.value)
    assert not (lake.models("churn", "run1") / "split").exists()


def test_a_dataset_too_small_to_split_is_refused(lake, spec):
    with pytest.raises(SplitError, match="big enough to split") as caught:
        write_split(lake, spec, VERSION, "run1", churn_frame(10))
    assert VERSION in str(caught.value) and "10 labelled rows" in str(caught.value)
    assert not (lake.models("churn", "run1") / "split").exists()


def test_rows_without_label_do_not_count_towards_the_minimum(spec):
    frame = churn_frame(60)
    frame.loc[frame.index[:40], "churned"] = None
    with pytest.raises(SplitError, match="big enough to split.*20 labelled rows"):
        check_splittable(frame, spec, VERSION)


def test_a_missing_label_column_is_refused(lake, spec):
    frame = churn_frame(200).drop(columns=["churned"])
    with pytest.raises(SplitError, match="label column") as caught:
        write_split(lake, spec, VERSION, "run1", frame)
    assert VERSION in str(caught.value) and "'churned'" in str(caught.value)


def test_a_class_too_rare_to_stratify_is_refused(spec):
    frame = churn_frame(200)
    frame.loc[frame.index[:2], "churned"] = "maybe"
    with pytest.raises(SplitError, match="at least 3 rows per class to stratify") as caught:
        check_splittable(frame, spec, VERSION)
    assert VERSION in str(caught.value) and "maybe" in str(caught.value)


def test_a_rare_class_is_fine_without_stratification(spec):
    frame = churn_frame(200)
    frame.loc[frame.index[:2], "churned"] = "maybe"
    check_splittable(frame, with_split(spec, stratify=False), VERSION)


@pytest.mark.parametrize("rare_rows", [3, 4])
def test_a_class_just_at_the_minimum_gives_a_split_error_not_a_crash(lake, spec, rare_rows):
    frame = churn_frame(100)
    frame.loc[frame.index[:rare_rows], "churned"] = "maybe"
    check_splittable(frame, spec, VERSION)  # enough rows to pass the per-class minimum ...
    # ... but too few for the second stratified cut (validation/test): sklearn's ValueError becomes a SplitError
    with pytest.raises(
        SplitError, match="enough rows of every class to stratify into train, validation and test"
    ) as caught:
        write_split(lake, spec, VERSION, "run1", frame)
    assert VERSION in str(caught.value) and "maybe" in str(caught.value)
    assert not isinstance(caught.value, ValueError)
    assert not (lake.models("churn", "run1") / "split").exists()


def test_a_rare_class_with_enough_rows_reaches_every_part(lake, spec):
    frame = churn_frame(100)
    frame.loc[frame.index[:5], "churned"] = "maybe"
    record = write_split(lake, spec, VERSION, "run1", frame)
    assert all(record["parts"][name]["classes"].get("maybe", 0) >= 1 for name in PARTS)
    assert sum(record["parts"][name]["classes"]["maybe"] for name in PARTS) == 5


# --- SplitDatasetOperator --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validated_lake(tmp_path_factory):
    """A lake holding two validated versions of churn, ingested once for this module: (first, latest)."""
    from conveyor.lake import Lake

    root = tmp_path_factory.mktemp("split-lake") / "lake"
    root.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVEYOR_LAKE_URI", root.as_uri())
        patch.delenv("CONVEYOR_LAKE_CONN_ID", raising=False)
        lake = Lake.from_env()
        write_drop(lake, "d1", {"customers.csv": churn_csv(300, seed=7)})
        first, _ = ingest_and_validate("d1", run_id="ingest1")
        write_drop(lake, "d2", {"customers.csv": churn_csv(300, seed=8)})
        latest, _ = ingest_and_validate("d2", run_id="ingest2")
    assert first["version"] != latest["version"]
    return SimpleNamespace(lake=lake, root=root, first=first["version"], latest=latest["version"])


@pytest.fixture
def versions(validated_lake, monkeypatch):
    monkeypatch.setenv("CONVEYOR_LAKE_URI", validated_lake.root.as_uri())
    monkeypatch.delenv("CONVEYOR_LAKE_CONN_ID", raising=False)
    return validated_lake


def split_op(version=None):
    from conveyor.operators.train import SplitDatasetOperator

    return SplitDatasetOperator(task_id="split", spec=pipeline_spec_dict("churn"), dataset_version=version)


def event_context(run_id, version):
    ctx = context(run_id)
    ctx["triggering_asset_events"] = {"churn_dataset": [SimpleNamespace(extra={"version": version})]}
    return ctx


def test_operator_splits_the_latest_version_by_default(versions):
    result = split_op().execute(context("op_latest"))
    assert result["dataset_version"] == versions.latest
    assert result["split_uri"] == str(versions.lake.models("churn", "op_latest") / "split")
    assert sum(part["rows"] for part in result["parts"].values()) == 300
    assert json.loads(json.dumps(result)) == result
    record = json.loads((versions.lake.models("churn", "op_latest") / "split" / "split.json").read_text())
    assert record["dataset_version"] == versions.latest


def test_operator_takes_the_explicit_version_first(versions):
    ctx = event_context("op_explicit", versions.latest)
    assert split_op(versions.first).execute(ctx)["dataset_version"] == versions.first


def test_operator_takes_the_triggering_event_version_over_latest(versions):
    assert split_op().execute(event_context("op_event", versions.first))["dataset_version"] == versions.first


def test_operator_treats_an_empty_version_param_as_not_given(versions):
    assert split_op("").execute(event_context("op_empty", versions.first))["dataset_version"] == versions.first


def test_operator_refuses_an_unknown_version(versions):
    absent = "v-" + "d" * 20  # well formed (lake.check_dataset_version), but never ingested
    with pytest.raises(AirflowFailException, match=f"{absent}.*does not exist or was not validated"):
        split_op(absent).execute(context("op_unknown"))
    assert not (versions.lake.models("churn", "op_unknown") / "split").exists()


def test_operator_refuses_an_unvalidated_version(versions):
    import shutil

    from conveyor.lake import read_json, write_json

    source = versions.lake.raw("churn", versions.first)
    unvalidated = "v-" + "0" * 19 + "1"
    target = versions.lake.raw("churn", unvalidated)
    shutil.copytree(source.path, target.path, ignore=shutil.ignore_patterns("validation.json"))
    manifest = read_json(target / "manifest.json")
    write_json(target / "manifest.json", {**manifest, "version": unvalidated})
    try:
        with pytest.raises(AirflowFailException, match=f"{unvalidated}.*not validated"):
            split_op(unvalidated).execute(context("op_unvalidated"))
        with pytest.raises(AirflowFailException, match="not validated"):
            split_op().execute(event_context("op_unvalidated_event", unvalidated))
    finally:
        shutil.rmtree(target.path)


def test_operator_refuses_a_malformed_version_in_latest(lake):
    from conveyor.lake import write_json

    write_json(lake.raw("churn") / "LATEST.json", {"version": "../../elsewhere"})
    with pytest.raises(AirflowFailException, match="LATEST.json"):
        split_op().execute(context("op_bad_latest"))
    assert not (lake.models("churn", "op_bad_latest") / "split").exists()


def test_operator_fails_when_nothing_was_ingested(lake):
    with pytest.raises(AirflowFailException, match="no validated dataset version yet"):
        split_op().execute(context("op_nothing"))


def test_operator_turns_a_split_error_into_a_fail_exception(versions, monkeypatch):
    import conveyor.data.datasets

    real = conveyor.data.datasets.read_table

    def one_class(*args, **kwargs):
        frame = real(*args, **kwargs)
        frame["churned"] = "no"
        return frame

    monkeypatch.setattr(conveyor.data.datasets, "read_table", one_class)
    with pytest.raises(AirflowFailException, match="at least 2 classes") as caught:
        split_op(versions.first).execute(context("op_one_class"))
    assert versions.first in str(caught.value)
    assert not isinstance(caught.value, SplitError)
    assert isinstance(caught.value.__cause__, SplitError)
    assert not (versions.lake.models("churn", "op_one_class") / "split").exists()
