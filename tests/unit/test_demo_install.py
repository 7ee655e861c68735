"""The installer (``plugins/conveyor/demo_install.py``): pip's configuration carried over to uv, pins checked."""

from __future__ import annotations

import subprocess

from conveyor import demo_install


def test_pips_configuration_becomes_the_same_sources_for_uv(monkeypatch):
    listing = "\n".join(
        [
            "global.cert='/etc/ssl/certs/ca.crt'",
            "global.constraint='/etc/xdg/pip/constraints.txt'",
            "global.extra-index-url='file:///opt/pypi/simple file:///opt/more/simple'",
            "global.find-links='/opt/wheels'",
            "global.index-url='https://mirror.example/simple'",
            ":env:.find-links='/srv/wheels'",  # PIP_FIND_LINKS wins over the file, as in pip
            ":env:.default-timeout='180'",
            "global.trusted-host='mirror.example'",
        ]
    )
    monkeypatch.setattr(
        demo_install.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing)
    )
    options, env = demo_install.uv_options(demo_install.pip_config("python"))
    assert options == [
        "--index-strategy",
        "unsafe-best-match",
        "--index-url",
        "https://mirror.example/simple",
        "--extra-index-url",
        "file:///opt/pypi/simple",
        "--extra-index-url",
        "file:///opt/more/simple",
        "--find-links",
        "/srv/wheels",
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
        "--allow-insecure-host",
        "mirror.example",
    ]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca.crt", "UV_HTTP_TIMEOUT": "180"}


def test_no_configuration_means_uvs_defaults_with_pips_index_rule():
    assert demo_install.uv_options({}) == (["--index-strategy", "unsafe-best-match"], {})


def test_a_package_installed_at_another_version_than_its_pin_is_named():
    constraints = "# pinned\nApache_Airflow==3.3.2\ntorch==2.14.1\nrich==14.0.0 ; python_version >= '3.9'\n"
    frozen = "apache-airflow==3.3.2\ntorch==2.13.0\nrich==14.0.0\nextra==1.0\n"
    assert demo_install.pin_mismatches(constraints, frozen) == ["torch: installed 2.13.0, pinned 2.14.1"]
    assert demo_install.pin_mismatches(constraints, "apache-airflow==3.3.2\n") == []  # not installed: no pin broken
