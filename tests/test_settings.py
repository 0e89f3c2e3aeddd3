"""The site file is validated once, at the edge, with errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crflow.errors import CrflowError
from crflow.settings import S3Storage, load_site

ROOT = Path(__file__).resolve().parent.parent


def site_error(tmp_path: Path, settings: dict) -> str:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(CrflowError) as caught:
        load_site(path)
    return str(caught.value)


def test_examples_load():
    local = load_site(ROOT / "examples" / "local.yaml")
    assert local.state_dir == (ROOT / ".state" / "local").resolve()  # relative to the file
    assert local.registry.server == "127.0.0.1:5000"
    seed = load_site(ROOT / "examples" / "microk8s-minio.yaml")
    assert seed.registry.server == "192.168.86.201:9005"
    assert isinstance(seed.storage, S3Storage)
    assert seed.storage.credentials.name == "minio-access-secret"
    assert seed.storage.ca_bundle == (ROOT / "examples" / "minio-ca.crt").resolve()
    assert not seed.storage.skip_verify
    hostpath = load_site(ROOT / "examples" / "microk8s-hostpath.yaml")
    assert (hostpath.storage.host_path.path, hostpath.storage.host_path.node) == ("/mnt/hdd1/container_registry", "node1")


def test_defaults_are_the_documented_ones(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("state_dir: state\n")
    site = load_site(path)
    assert (site.target, site.release, site.auth.bcrypt_cost, site.tls.key_algorithm) == ("local", "registry", 5, "ecdsa-p256")
    assert site.data_dir == tmp_path / "state" / "data"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "state_dir: required key is missing"),
        ({"state_dir": "s", "target": "cloud"}, "target: Input should be 'local' or 'kubernetes'"),
        ({"state_dir": "s", "target": "kubernetes"}, "storage.kind: filesystem is for the local target"),
        ({"state_dir": "s", "registry": {"ips": [], "dns_names": []}}, "give at least one of registry.ips or registry.dns_names"),
        ({"state_dir": "s", "registry": {"dns_names": ["bad_name!"]}}, "registry.dns_names.0: 'bad_name!' is not a DNS name"),
        ({"state_dir": "s", "registry": {"service_type": "NodePort", "port": 5000}},
         "with service_type NodePort the port is the node port, 30000-32767"),
        ({"state_dir": "s", "tls": {"server_days": 9000}}, "tls.server_days: Input should be less than or equal to 825"),
        ({"state_dir": "s", "auth": {"bcrypt_cost": 3}}, "auth.bcrypt_cost: Input should be greater than or equal to 4"),
        ({"state_dir": "s", "storage": {"kind": "s3", "endpoint": "minio:9000", "bucket": "abc", "credentials": {"file": "k"}}},
         "storage.endpoint: 'minio:9000' is not a URL starting with http:// or https://"),
        ({"state_dir": "s", "storage": {"kind": "s3", "endpoint": "http://m:9000", "bucket": "abc"}},
         "storage.credentials.file: the local target reads the S3 keys from a file"),
        ({"state_dir": "s", "target": "kubernetes", "storage": {"kind": "pvc"}},
         "storage: give exactly one of existing_claim or host_path"),
        ({"state_dir": "s", "pull_secrets": {"namespaces": ["team-a"]}}, "pull_secrets: namespaces need target: kubernetes"),
        ({"state_dir": "s", "pull_secrets": {"namespaces": ["Team_A"]}}, "pull_secrets.namespaces.0: 'Team_A' is not a Kubernetes name"),
        ({"state_dir": "s", "rotation": {"grace_seconds": -1}}, "rotation.grace_seconds: Input should be greater than"),
        ({"state_dir": "s", "chart": {"values": {"storage": "s3"}}},
         "chart.values: storage is set by crflow from storage; set it there, not in chart.values"),
        ({"state_dir": "s", "target": "kubernetes", "storage": {"kind": "pvc", "existing_claim": "data"},
          "node_trust": {"runtime": "containerd"},
          "mirrors": [{"name": "hub", "upstream": "https://h", "prefix": "docker.io", "port": 5443, "keep_days": 1}]},
         "mirrors: hub: keep_days reads when the mirror cached each manifest from the storage, which crflow cannot "
         "read on a cluster volume"),
        ({"state_dir": "s", "chart": {"values": {"mirrors": [{"name": "hub", "remoteurl": "https://h"}]}}},
         "chart.values: mirrors: crflow sets the chart's mirrors from the site file's mirrors key"),
    ],
)
def test_errors_name_the_key(tmp_path, settings, message):
    assert message in site_error(tmp_path, settings)


def test_every_problem_is_reported_at_once(tmp_path):
    error = site_error(tmp_path, {"state_dir": "s", "registry": {"port": 0, "ipz": []}})
    assert "registry.port" in error and "registry.ipz: unknown key" in error


def test_not_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("registry: [unclosed\n")
    with pytest.raises(CrflowError, match="is not valid YAML"):
        load_site(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- just a list\n")
    with pytest.raises(CrflowError, match="expected a mapping"):
        load_site(tmp_path / "b.yaml")


def test_ipv6_address_is_bracketed_for_clients(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "s", "registry": {"ips": ["::1"], "port": 5001}}))
    assert load_site(path).registry.server == "[::1]:5001"


@pytest.mark.parametrize(("settings", "expected"), [
    ({"registry": {"dns_names": ["bad_name!"]}},
     "registry.dns_names.0: 'bad_name!' is not a DNS name (labels of letters, digits and inner dashes, joined by dots)"),
    ({"namespace": "Bad_NS"}, "namespace: 'Bad_NS' is not a Kubernetes name"),
    ({"state_dir": "FILE"}, "is a file; state_dir is the directory crflow keeps its state in"),
])
def test_errors_say_what_fits_not_the_pattern(tmp_path, settings, expected):
    (tmp_path / "a-file").write_text("")
    settings = {"state_dir": str(tmp_path / "state"), **settings}
    if settings["state_dir"] == "FILE":
        settings["state_dir"] = str(tmp_path / "a-file")
    message = site_error(tmp_path, settings)
    assert expected in message and "^" not in message and "\n" not in message


def test_yaml_anchors_and_aliases_are_refused(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("state_dir: &s state\nrelease: registry\nnamespace: *s\n")
    with pytest.raises(CrflowError, match="anchors and aliases"):
        load_site(path)
