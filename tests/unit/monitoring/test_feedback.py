"""Feedback labels: reading drop files (csv, jsonl, json, parquet; id and label aliases), the row rules
(unknown id, duplicates, already labelled, labels outside the class set, regression labels), and the
bodies of ``POST /feedback``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conveyor.errors import ConveyorError
from conveyor.monitoring.feedback import (
    RULE_CLASS,
    RULE_DUPLICATE,
    RULE_LABELLED,
    RULE_MISSING,
    RULE_NUMBER,
    RULE_UNKNOWN,
    FeedbackDropError,
    canonical_label,
    check_rows,
    feedback_records,
    read_drop,
    read_file,
    rule_counts,
    save_rejected,
)
from conveyor.spec import get_spec


@pytest.fixture(scope="module")
def spec():
    """The churn pipeline: id column ``customer_id``, label ``churned``."""
    return get_spec("churn")


def storage(path: Path):
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(path.as_uri())


def write(tmp_path: Path, name: str, data: bytes | str) -> tuple[str, object]:
    """A drop file and its ``(relative name, ObjectStoragePath)``."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return name, storage(path)


def rows_of(frame: pd.DataFrame) -> list[tuple]:
    return list(zip(frame["id"], frame["label"]))


# ------------------------------------------------------------------------------------ reading


def test_every_file_format_reads_as_text_ids_and_labels(tmp_path, spec):
    csv = write(tmp_path, "a.csv", "id,label\nC-1,yes\nC-2, no \n")
    jsonl = write(tmp_path, "b.jsonl", '{"id": "C-3", "label": "yes"}\n\n{"id": 4, "label": "no"}\n')
    listed = write(tmp_path, "c.json", json.dumps([{"id": "C-5", "label": "yes"}]))
    wrapped = write(tmp_path, "d.json", json.dumps({"feedback": [{"id": "C-6", "label": "no"}]}))
    parquet_path = tmp_path / "e.parquet"
    pd.DataFrame({"id": [7, 8], "label": [1, 0]}).to_parquet(parquet_path, index=False)
    parquet = ("e.parquet", storage(parquet_path))

    rows = read_drop([csv, jsonl, listed, wrapped, parquet], spec)
    assert rows_of(rows) == [
        ("C-1", "yes"),
        ("C-2", "no"),
        ("C-3", "yes"),
        ("4", "no"),
        ("C-5", "yes"),
        ("C-6", "no"),
        ("7", "1"),
        ("8", "0"),
    ]
    assert list(rows["file"]) == ["a.csv"] * 2 + ["b.jsonl"] * 2 + ["c.json", "d.json"] + ["e.parquet"] * 2


def test_a_single_json_object_is_one_row(tmp_path, spec):
    _, path = write(tmp_path, "one.json", json.dumps({"id": "C-1", "label": "yes"}))
    assert rows_of(read_file(path, spec)) == [("C-1", "yes")]


def test_the_pipelines_id_column_and_label_name_are_accepted(tmp_path, spec):
    _, path = write(tmp_path, "named.csv", "customer_id,churned,extra\nC-1,yes,x\nC-2,no,y\n")
    frame = read_file(path, spec)
    assert list(frame.columns) == ["id", "label"] and rows_of(frame) == [("C-1", "yes"), ("C-2", "no")]


def test_empty_cells_become_none(tmp_path, spec):
    _, path = write(tmp_path, "gaps.csv", "id,label\nC-1,\n,yes\nC-3,   \n")
    assert rows_of(read_file(path, spec)) == [("C-1", None), (None, "yes"), ("C-3", None)]


def test_missing_columns_name_the_file_and_the_rule(tmp_path, spec):
    _, path = write(tmp_path, "wrong.csv", "ident,truth\nC-1,yes\n")
    with pytest.raises(FeedbackDropError) as error:
        read_file(path, spec)
    assert isinstance(error.value, ConveyorError) and isinstance(error.value, ValueError)  # deterministic
    message = str(error.value)
    assert message.startswith("wrong.csv: ")
    assert "needs an id column 'id' (or 'customer_id')" in message and "label column 'label' (or 'churned')" in message
    assert "found ['ident', 'truth']" in message


def test_unreadable_files_name_the_file(tmp_path, spec):
    for name, data in (
        ("bad.json", "{not json"),
        ("bad.jsonl", '{"id": 1, "label": "yes"}\nnope\n'),
        ("bad.parquet", b"not parquet"),
        ("empty.csv", b""),
    ):
        _, path = write(tmp_path, name, data)
        with pytest.raises(FeedbackDropError, match=rf"^{name}: not a readable feedback file \("):
            read_file(path, spec)


def s3_error(status: int, code: str) -> OSError:
    """What s3fs raises for an S3 error response (its translation of botocore's ClientError, the cause kept)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "GetObject"))


@pytest.mark.parametrize(
    "error",
    [
        lambda: s3_error(503, "SlowDown"),
        lambda: s3_error(500, "InternalError"),
        lambda: __import__("botocore.exceptions").exceptions.ReadTimeoutError(endpoint_url="http://minio:9000"),
        lambda: TimeoutError("read timed out"),
        lambda: OSError(5, "Input/output error"),
    ],
    ids=["s3-503", "s3-500", "read-timeout", "timeout", "EIO"],
)
def test_a_storage_failure_is_not_the_files_fault(tmp_path, spec, monkeypatch, error):
    from airflow.sdk import ObjectStoragePath

    failure = error()
    _, path = write(tmp_path, "labels.csv", "id,label\nC-1,yes\n")

    def read_bytes(self):
        raise failure

    monkeypatch.setattr(ObjectStoragePath, "read_bytes", read_bytes)
    with pytest.raises(type(failure)) as caught:
        read_file(path, spec)
    assert caught.value is failure  # propagates as it is: the drop stays in landing and the task is retried


def test_a_file_the_store_does_not_have_or_refuses_is_still_rejected(tmp_path, spec, monkeypatch):
    from airflow.sdk import ObjectStoragePath

    _, path = write(tmp_path, "labels.csv", "id,label\nC-1,yes\n")
    for failure in (s3_error(404, "NoSuchKey"), s3_error(403, "AccessDenied")):

        def read_bytes(self, failure=failure):
            raise failure

        monkeypatch.setattr(ObjectStoragePath, "read_bytes", read_bytes)
        with pytest.raises(FeedbackDropError, match=r"^labels.csv: not a readable feedback file"):
            read_file(path, spec)


def test_a_drop_without_rows_or_files_or_with_another_file_is_refused(tmp_path, spec):
    header = write(tmp_path, "header.csv", "id,label\n")
    with pytest.raises(FeedbackDropError, match=r"^header.csv: no feedback rows"):
        read_drop([header], spec)
    with pytest.raises(FeedbackDropError, match="holds no feedback file"):
        read_drop([], spec)
    good = write(tmp_path, "good.csv", "id,label\nC-1,yes\n")
    notes = write(tmp_path, "notes.txt", "labels from the call centre")
    with pytest.raises(
        FeedbackDropError, match=r"^notes.txt: feedback files must be one of .csv, .jsonl, .json, .parquet"
    ):
        read_drop([good, notes], spec)


# ------------------------------------------------------------------------------------ rules


def frame(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame([{"id": i, "label": label, "file": "f.csv"} for i, label in rows], dtype=object)


def rules(rejected: pd.DataFrame) -> dict[str, str]:
    return dict(zip(rejected["id"].map(str), rejected["rule"]))


def test_check_rows_applies_every_rule_and_keeps_arrival_order():
    rows = frame(
        ("a", "yes"),
        ("b", "no"),
        ("a", "no"),
        ("zzz", "yes"),
        ("c", "maybe"),
        ("old", "yes"),
        ("d", None),
        (None, "yes"),
        ("e", "YES"),
        ("f", "No"),
    )
    accepted, rejected = check_rows(
        rows, ["no", "yes"], known_ids={"a", "b", "c", "d", "e", "f", "old"}, labelled_ids={"old"}
    )
    assert rows_of(accepted) == [("a", "yes"), ("b", "no"), ("e", "yes"), ("f", "no")]  # canonical case
    assert list(accepted.columns) == ["id", "label", "file"]
    assert list(rejected.columns) == ["id", "label", "file", "rule"]
    assert rules(rejected) == {
        "a": RULE_DUPLICATE,
        "zzz": RULE_UNKNOWN,
        "c": f"{RULE_CLASS} ['no', 'yes']",
        "old": RULE_LABELLED,
        "d": RULE_MISSING,
        "None": RULE_MISSING,
    }
    assert rejected.loc[rejected["id"] == "a", "label"].tolist() == ["no"]  # the later label is the one kept aside


def test_a_rejected_first_label_does_not_block_a_valid_later_one():
    accepted, rejected = check_rows(frame(("a", "maybe"), ("a", "yes")), ["no", "yes"], {"a"}, set())
    assert rows_of(accepted) == [("a", "yes")] and rules(rejected) == {"a": f"{RULE_CLASS} ['no', 'yes']"}


def test_numeric_classes_accept_labels_written_another_way():
    accepted, rejected = check_rows(
        frame(("a", "1.0"), ("b", "0"), ("c", "2"), ("d", "1e0"), ("e", "one")),
        ["0", "1"],
        {"a", "b", "c", "d", "e"},
        set(),
    )
    assert rows_of(accepted) == [("a", "1"), ("b", "0"), ("d", "1")]
    assert set(rules(rejected)) == {"c", "e"}
    assert canonical_label("True", ["False", "True"]) == "True" and canonical_label("true", ["False", "True"]) == "True"
    assert canonical_label("anything", None) == "anything"
    assert canonical_label("nan", ["0", "1"]) is None


def test_regression_labels_must_be_numbers():
    accepted, rejected = check_rows(
        frame(("a", "12.5"), ("b", "-3"), ("c", "twelve"), ("d", "nan"), ("e", "-inf")),
        None,
        {"a", "b", "c", "d", "e"},
        set(),
    )
    assert rows_of(accepted) == [("a", "12.5"), ("b", "-3")]
    assert rules(rejected) == {"c": RULE_NUMBER, "d": RULE_NUMBER, "e": RULE_NUMBER}


def test_check_rows_of_nothing():
    accepted, rejected = check_rows(frame(), ["no", "yes"], set(), set())
    assert accepted.empty and rejected.empty and list(rejected.columns)[-1] == "rule"
    assert rule_counts(rejected) == {"unknown_ids": 0, "duplicates": 0, "out_of_set": 0}


def test_rejected_rows_are_counted_by_rule_and_kept_in_quarantine(lake):
    rows = frame(("a", "yes"), ("a", "no"), ("zzz", "yes"), ("c", "maybe"), ("old", "yes"), ("d", None))
    _, rejected = check_rows(rows, ["no", "yes"], {"a", "c", "d", "old"}, {"old"})
    assert rule_counts(rejected) == {"unknown_ids": 1, "duplicates": 2, "out_of_set": 1}  # an empty id/label: none
    target = save_rejected(lake, "churn", "f1", rejected)
    assert str(target) == str(lake.quarantine("churn", "feedback/f1") / "rejected.csv")
    kept = pd.read_csv(Path(target.path), dtype=str, keep_default_na=False)
    assert kept.columns.tolist() == ["id", "label", "file", "rule"]
    assert kept["id"].tolist() == ["a", "zzz", "c", "old", "d"]


# ------------------------------------------------------------------------------- POST bodies


def test_feedback_records_accepts_one_a_list_or_a_wrapper():
    assert feedback_records({"id": "a", "label": "yes"}) == [{"id": "a", "label": "yes"}]
    assert feedback_records([{"id": 1, "label": 0}, {"id": "b", "label": True, "note": "x"}]) == [
        {"id": "1", "label": "0"},
        {"id": "b", "label": "True"},
    ]
    assert feedback_records({"feedback": [{"id": "c", "label": "no"}]}) == [{"id": "c", "label": "no"}]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "feedback must be"),
        ({"feedback": []}, "feedback must be"),
        ("yes", "feedback must be"),
        (42, "feedback must be"),
        ([{"id": "a"}], "record 1: needs 'id' and 'label'"),
        ([{"id": "a", "label": "yes"}, "b"], "record 2: needs 'id' and 'label'"),
        ([{"id": " ", "label": "yes"}], "record 1: 'id' and 'label' must not be empty"),
        ([{"id": "a", "label": None}], "record 1: 'id' and 'label' must not be empty"),
        ([{"id": {"x": 1}, "label": "yes"}], "record 1: 'id' and 'label' must be plain values"),
        ([{"id": "a", "label": ["yes"]}], "record 1: 'id' and 'label' must be plain values"),
    ],
)
def test_feedback_records_refuses_bad_bodies(payload, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        feedback_records(payload)
