"""Shared fixtures for integration tests: an S3 lake served by moto's server on loopback."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3/SageMaker server on 127.0.0.1 (an ephemeral port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_lake(moto_server, monkeypatch, request):
    """A fresh bucket on moto as the lake root, reached through an Airflow AWS connection."""
    import boto3

    from conveyor.lake import Lake

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"lake-{request.node.name.lower().replace('_', '-')[:40]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_S3", json.dumps(connection))
    monkeypatch.setenv("CONVEYOR_LAKE_URI", f"s3://{bucket}/conveyor")
    monkeypatch.setenv("CONVEYOR_LAKE_CONN_ID", "lake_s3")
    return Lake.from_env()
