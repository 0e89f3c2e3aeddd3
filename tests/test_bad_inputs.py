"""Bad inputs give one clear line on stderr, exit 1, and change nothing they should not."""

from __future__ import annotations

import os
import socket

import pytest
import yaml
from test_install_local import VAULT_TASKS

from conftest import cached_tasks
from servers import BIN


def one_error_line(result) -> str:
    """The CLI's last stderr line is its error; no Python traceback reached the terminal."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("crflow: error: ")
    return last


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"registry": {"ips": ["192.168.86.300"]}}, "registry.ips: '192.168.86.300' is not an IP address"),
        ({"registry": {"port": 70000}}, "registry.port: Input should be less than or equal to 65535"),
        ({"registy": {"port": 5000}}, "registy: unknown key"),
        ({"storage": {"kind": "s3", "endpoint": "https://minio:9000", "bucket": "B",
                      "credentials": {"file": "k.yaml"}}}, "storage.bucket: 'B' is not an S3 bucket name"),
        ({"storage": {"kind": "pvc", "existing_claim": "x"}}, "storage.kind: pvc needs target: kubernetes"),
        ({"storage": {"kind": "s3", "endpoint": "https://minio:9000", "bucket": "registry", "skip_verify": True,
                      "ca_bundle": "ca.crt", "credentials": {"file": "k.yaml"}}},
         "give ca_bundle or skip_verify: true, not both"),
    ],
    ids=["bad-ip", "bad-port", "unknown-key", "bad-bucket", "pvc-on-local", "ca-and-skip-verify"],
)
def test_bad_settings_name_the_key_and_touch_nothing(crflow, make_site, change, expected):
    site = make_site()
    settings = {**site.settings, **change}
    if "registry" in change:
        settings["registry"] = {**site.settings["registry"], **change["registry"]}
    site.path.write_text(yaml.safe_dump(settings))
    line = one_error_line(crflow("install", "-c", str(site.path), check=False))
    assert expected in line
    assert not site.state.exists()


def test_unreadable_settings_file(crflow, tmp_path):
    line = one_error_line(crflow("install", "-c", str(tmp_path / "missing.yaml"), check=False))
    assert "cannot read site file" in line and "No such file" in line
    line = one_error_line(crflow("install", "-c", str(tmp_path), check=False))  # a directory
    assert "cannot read site file" in line and "Is a directory" in line


def test_port_in_use_fails_before_anything_is_made(crflow, make_site):
    site = make_site()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", site.port))
        squatter.listen()
        line = one_error_line(crflow("install", "-c", str(site.path), check=False))
    assert f"port {site.port} on 127.0.0.1 is in use by another process" in line
    assert not (site.state / "results").exists()


def test_missing_registry_binary_says_how_to_install_it(crflow, make_site):
    site = make_site()
    path_without_registry = f"{BIN}:/nonexistent"
    result = crflow("install", "-c", str(site.path), check=False, env={"PATH": path_without_registry})
    line = one_error_line(result)
    assert "docker-registry was not found" in line and "apt-get install docker-registry" in line
    assert not (site.state / "results").exists()


def test_missing_result_key_is_an_error_not_a_new_ca(crflow, installed):
    ca = (installed.client / "ca.crt").read_bytes()
    results = sorted(p.name for p in (installed.state / "results").iterdir())
    (installed.state / "result.key").unlink()
    line = one_error_line(crflow("install", "-c", str(installed.path), check=False))
    assert "missing result key" in line and "CRFLOW_RESULT_KEY" in line
    assert not (installed.state / "result.key").exists()
    assert sorted(p.name for p in (installed.state / "results").iterdir()) == results
    assert (installed.client / "ca.crt").read_bytes() == ca


def test_wrong_result_key_is_an_error(crflow, installed):
    from cryptography.fernet import Fernet

    other = Fernet.generate_key().decode()
    line = one_error_line(crflow("install", "-c", str(installed.path), check=False,
                                 env={"CRFLOW_RESULT_KEY": other}))
    assert "wrong result key" in line
    # The right key in the environment works as well as the key file does.
    right = (installed.state / "result.key").read_text().strip()
    os.rename(installed.state / "result.key", installed.state / "result.key.moved")
    crflow("install", "-c", str(installed.path), env={"CRFLOW_RESULT_KEY": right})
    assert cached_tasks(crflow.api, installed.path) == sorted(VAULT_TASKS)  # every secret read back, none made
