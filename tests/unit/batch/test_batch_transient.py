"""Storage failures while a batch reads its input are not bad input (issue 17 item 8): an I/O or network
error, a timeout or a store's 5xx propagates as it is, so Airflow retries the task, while a file that
cannot be read as CSV or Parquet stays a deterministic ``BatchInputError`` (the task fails at once)."""

from __future__ import annotations

import errno

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.batch.readers import BatchInputError, Columns, checked_files, lake_path
from conveyor.operators.base import airflow_errors

COLUMNS = Columns({"tenure_months": "int64", "contract": "object"}, "customer_id")


def s3_slow_down() -> OSError:
    """What s3fs raises for S3's ``503 SlowDown`` once its own retries are spent (the ClientError its cause)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}
    return translate_boto_error(ClientError({**response, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"))


def frame() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": ["C1", "C2"], "tenure_months": [1, 2], "contract": ["monthly", "yearly"]})


def failing(error: Exception):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        OSError(errno.ESTALE, "Stale file handle"),
        TimeoutError("read timed out"),
        "s3",
    ],
    ids=["EIO", "ETIMEDOUT", "ESTALE", "timeout", "s3-503"],
)
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_storage_failure_while_reading_propagates_to_be_retried(tmp_path, monkeypatch, kind, error):
    import pyarrow
    import pyarrow.parquet

    error = s3_slow_down() if error == "s3" else error
    path = tmp_path / f"rows.{kind}"
    frame().to_csv(path, index=False) if kind == "csv" else frame().to_parquet(path, index=False)
    if kind == "csv":
        monkeypatch.setattr(pyarrow, "input_stream", failing(error))
    else:
        monkeypatch.setattr(pyarrow.parquet, "read_schema", failing(error))
    with pytest.raises(type(error)) as caught, airflow_errors():
        checked_files(lake_path(path, None), COLUMNS, 100)
    assert caught.value is error  # not a BatchInputError, not an AirflowFailException: Airflow retries


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_an_unreadable_file_stays_bad_input(tmp_path, kind):
    path = tmp_path / f"rows.{kind}"
    path.write_bytes(
        b"\x00\x01 not a table \xff" * 10
        if kind == "parquet"
        else b"customer_id,tenure_months,contract\nC1,1,monthly,extra\n"
    )
    with pytest.raises(AirflowFailException, match=f"rows.{kind}: cannot be read as") as caught, airflow_errors():
        checked_files(lake_path(path, None), COLUMNS, 100)
    assert isinstance(caught.value.__cause__, BatchInputError)
