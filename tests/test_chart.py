"""Our chart, rendered by the real helm binary with the values crflow builds, checked by
`helm lint --strict` and by kubernetes-validate --strict against Kubernetes' own schemas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crflow import chart
from crflow.chart import CHART_DIR
from crflow.settings import load_site
from crflow.tasks.helm import helm_executable

ROOT = Path(__file__).resolve().parent.parent
OLDEST, NEWEST = "1.25.0", "1.37.0"  # kubernetes-validate's range here


def values_for(example: str) -> dict:
    return chart.values_for(load_site(ROOT / "examples" / example), cert_fingerprint="AA:BB")


def helm(*args: str, values: dict | None = None) -> str:
    result = subprocess.run([helm_executable(), *args, *(["--values", "-"] if values is not None else [])],
                            input=json.dumps(values or {}), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def template(values: dict, *extra: str) -> list[dict]:
    text = helm("template", "registry", str(CHART_DIR), "--namespace", "container-registry", *extra, values=values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def validate(manifests: list[dict], version: str, tmp_path: Path) -> None:
    path = tmp_path / f"manifests-{version}.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    result = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet",
                             "-k", version, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


SETUPS = {
    "local (filesystem on a claim)": values_for("local.yaml"),
    "runbook (S3 on MinIO, LoadBalancer 192.168.86.201:9005)": values_for("microk8s-minio.yaml"),
    "runbook PV/PVC (hostPath on node1)": values_for("microk8s-hostpath.yaml"),
    "chart defaults (emptyDir)": {},
    "garbage collection on": {**values_for("microk8s-minio.yaml"), "garbageCollect": {"enabled": True}},
}


def test_lint_is_clean():
    out = helm("lint", "--strict", str(CHART_DIR), values=values_for("microk8s-minio.yaml"))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_rendered_manifests_pass_strict_schema_validation(setup, version, tmp_path):
    validate(template(SETUPS[setup], "--kube-version", version), version, tmp_path)


def test_runbook_setup_renders_what_the_runbook_does():
    manifests = {m["kind"]: m for m in template(SETUPS["runbook (S3 on MinIO, LoadBalancer 192.168.86.201:9005)"])
                 if m["metadata"]["name"] != chart.node_trust_name("registry")}  # tested on its own below
    service = manifests["Service"]["spec"]
    assert (service["type"], service["loadBalancerIP"], service["ports"][0]["port"]) == ("LoadBalancer", "192.168.86.201", 9005)
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yml"])
    assert config["storage"]["s3"]["bucket"] == "container-registry"
    assert config["storage"]["redirect"] == {"disable": True}  # clients need not reach MinIO
    assert config["auth"]["htpasswd"]["path"] == "/auth/htpasswd"
    pod = manifests["Deployment"]["spec"]["template"]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["REGISTRY_STORAGE_S3_ACCESSKEY"]["valueFrom"]["secretKeyRef"] == {"name": "registry-s3", "key": "s3AccessKey"}
    assert "REGISTRY_STORAGE_S3_SKIPVERIFY" not in env  # verification stays on; the CA bundle is trusted
    assert env["SSL_CERT_DIR"]["value"] == "/etc/ssl/certs:/etc/ssl/s3"
    auth_mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "auth")
    assert "subPath" not in auth_mount  # so the kubelet refreshes it in place on rotation
    assert set(pod["metadata"]["annotations"]) >= {"checksum/config", "checksum/secret"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "Secret" not in manifests  # the chart only references Secrets; it never carries their content


def test_skip_verify_is_an_explicit_opt_in():
    values = values_for("microk8s-minio.yaml")
    values["s3"] = {**values["s3"], "caBundleSecretName": "", "skipVerify": True}
    pod = next(m for m in template(values) if m["kind"] == "Deployment")["spec"]["template"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["REGISTRY_STORAGE_S3_SKIPVERIFY"] == "true"


def test_a_new_server_certificate_or_config_rolls_the_pod():
    def annotations(values):
        return next(m for m in template(values) if m["kind"] == "Deployment")["spec"]["template"]["metadata"]["annotations"]

    base = values_for("local.yaml")
    assert annotations(base) == annotations(dict(base))
    assert annotations({**base, "secretsChecksum": "CC:DD"})["checksum/secret"] != annotations(base)["checksum/secret"]
    assert annotations({**base, "configData": {"version": 0.1, "http": {"addr": ":5001"}}})["checksum/config"] != \
        annotations(base)["checksum/config"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--kube-version", "1.20.0"], "batch/v1beta1"),  # offline, old cluster
        (["--kube-version", "1.30.0"], "batch/v1"),  # offline: helm lists no kinds, the version decides
        (["--kube-version", "1.30.0", "--api-versions", "batch/v1beta1/CronJob"], "batch/v1beta1"),  # API lacks v1
        (["--kube-version", "1.20.0", "--api-versions", "batch/v1/CronJob"], "batch/v1"),  # API has v1
    ],
)
def test_cronjob_api_version_follows_the_cluster(extra, expected):
    manifests = template({"garbageCollect": {"enabled": True}, "persistence": {"enabled": True}}, *extra)
    (cronjob,) = [m for m in manifests if m["kind"] == "CronJob"]
    assert cronjob["apiVersion"] == expected


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_deployments_manifests_pass_strict_schema_validation(version, tmp_path):
    for manifest in (ROOT / "deployments").glob("*.yaml"):
        validate([doc for doc in yaml.safe_load_all(manifest.read_text()) if doc], version, tmp_path)


@pytest.mark.parametrize("example", ["local.yaml", "microk8s-minio.yaml", "microk8s-hostpath.yaml"])
def test_every_name_in_the_chart_contract_is_in_the_rendered_chart(example):
    """crflow/chart.py names what both sides share; a rename on either side fails here."""
    site = load_site(ROOT / "examples" / example)
    values = chart.values_for(site, cert_fingerprint="AA:BB")
    manifests = template(values)
    pod = next(m for m in manifests if m["kind"] == "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == chart.CONTAINER]
    assert container["command"] == [chart.COMMAND] and container["args"] == ["serve", chart.CONFIG_PATH]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = next(m for m in manifests if m["kind"] == "ConfigMap"
                      and m["metadata"]["name"] == volumes[chart.CONFIG_VOLUME]["configMap"]["name"])
    assert chart.CONFIG_FILE in config_map["data"]

    # Every Secret the pod references is one crflow makes, with the keys the contract lists.
    referenced = {v["secret"]["secretName"]: [i["key"] for i in v["secret"].get("items") or []]
                  for v in pod["volumes"] if "secret" in v}
    for var in container.get("env") or []:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            referenced.setdefault(ref["name"], []).append(ref["key"])
    made = {chart.secret_name(site.release, role): keys for role, (_, _, keys) in chart.SECRETS.items()}
    for name, keys in referenced.items():
        assert name in made, f"the chart references Secret {name}, which crflow does not make"
        assert set(keys) <= set(made[name]), f"Secret {name}: the chart reads {keys}, crflow writes {made[name]}"
    expected = {"tls", "htpasswd", "http"} | ({"s3"} if site.storage.kind == "s3" else set())
    assert {chart.secret_name(site.release, role) for role in expected} <= set(referenced)
    if site.storage.kind != "s3":
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [getattr(site.storage, "existing_claim", None) or chart.data_claim(site.release)]

    # The values crflow sets are the chart's own keys.
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(chart.CRFLOW_VALUES) <= set(chart_values), set(chart.CRFLOW_VALUES) - set(chart_values)
    assert set(values) - set(site.chart.values) <= set(chart.CRFLOW_VALUES)


RUNTIME_DIRS = {"containerd": "/etc/containerd/certs.d", "microk8s": "/var/snap/microk8s/current/args/certs.d",
                "k3s": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d", "docker": "/etc/docker/certs.d"}


@pytest.mark.parametrize("runtime", RUNTIME_DIRS)
def test_node_trust_mounts_only_the_runtimes_directory_and_the_ca(runtime):
    site = load_site(ROOT / "examples" / "microk8s-minio.yaml")
    values = chart.merged(chart.values_for(site, cert_fingerprint="AA:BB"), {"nodeTrust": {"runtime": runtime}})
    manifests = template(values)
    (ds,) = [m for m in manifests if m["kind"] == "DaemonSet"]
    assert ds["metadata"]["name"] == chart.node_trust_name(site.release)
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert [v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v] == [RUNTIME_DIRS[runtime]]
    # The CA alone: the server's key (in the tls Secret) never reaches a node-trust pod.
    assert [v["secret"] for v in volumes.values() if "secret" in v] == [
        {"secretName": chart.secret_name(site.release, "ca"), "items": [{"key": "ca.crt", "path": "ca.crt"}]}]
    assert set(chart.SECRETS["ca"][2]) == {"ca.crt"}
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ADDRESSES"] == " ".join(site.registry.servers)
    assert env["FORMAT"] == ("certs" if runtime == "docker" else "containerd")
    assert container["image"] == next(m for m in manifests if m["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["image"]  # nothing new to pull
    assert pod["automountServiceAccountToken"] is False and pod["tolerations"] == [{"operator": "Exists"}]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert not any(m["kind"] == "DaemonSet" for m in template(values_for("local.yaml")))  # not on the local target


def test_the_garbage_collect_cronjob_matches_no_service_and_mounts_only_config_and_storage():
    manifests = template({**values_for("microk8s-minio.yaml"), "garbageCollect": {"enabled": True}})
    (cronjob,) = [m for m in manifests if m["kind"] == "CronJob"]
    (service,) = [m for m in manifests if m["kind"] == "Service"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    selector = service["spec"]["selector"]
    assert not selector.items() <= pod["metadata"]["labels"].items()  # the Service sends it no traffic
    assert {v["name"] for v in pod["spec"]["volumes"]} <= {"config", "data", "s3-ca"}  # no TLS key, no htpasswd
    assert {m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]} <= {"config", "data", "s3-ca"}
    assert yaml.safe_load((CHART_DIR / "values.yaml").read_text())["garbageCollect"]["enabled"] is False


def test_the_garbage_collect_cronjob_refuses_an_emptydir():
    result = subprocess.run([helm_executable(), "template", "r", str(CHART_DIR), "--set", "garbageCollect.enabled=true"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "the storage is an emptyDir" in result.stderr
