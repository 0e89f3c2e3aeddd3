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


# --- what a platform engineer reaches for: every option on --------------------------------
MONITORING = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
              "--api-versions", "monitoring.coreos.com/v1/PrometheusRule"]
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
EVERY_OPTION = chart.merged(values_for("microk8s-minio.yaml"), {
    "replicaCount": 3,
    "namespaceOverride": "registry-system",
    "deploymentAnnotations": {"example.com/owner": "platform"},
    "service": {"labels": {"team": "platform"}, "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}},
    "ingress": {"enabled": True, "className": "nginx", "hosts": ["registry.example.com"],
                "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS",
                                "nginx.ingress.kubernetes.io/proxy-body-size": "0"},
                "tls": [{"secretName": "registry-ingress-tls", "hosts": ["registry.example.com"]}]},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/registry"}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
    "priorityClassName": "system-cluster-critical",
    "extraVolumes": [{"name": "scratch", "emptyDir": {}}],
    "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    "initContainers": [{"name": "wait", "image": "registry:2.8.3", "command": ["/bin/true"],
                        "securityContext": RESTRICTED_CONTAINER}],
    "sidecars": [{"name": "sidecar", "image": "registry:2.8.3", "command": ["/bin/sleep", "infinity"],
                  "securityContext": RESTRICTED_CONTAINER}],
    "s3": {"chunksize": 20971520, "storageclass": "REDUCED_REDUNDANCY", "v4auth": True, "keyid": "kms-key",
           "encrypt": True, "multipartcopythresholdsize": 67108864, "useragent": "crflow"},
    "metrics": {"serviceMonitor": {"labels": {"release": "prometheus"}},
                "prometheusRule": {"labels": {"release": "prometheus"}}},
    "garbageCollect": {"enabled": True},
})
SETUPS["every option on"] = EVERY_OPTION
SETUPS["two pull-through mirrors"] = chart.merged(values_for("microk8s-minio.yaml"), {"mirrors": [
    {"name": "docker-io", "remoteurl": "https://registry-1.docker.io", "secretRef": "hub-login",
     "caBundleSecretName": "hub-ca", "service": {"type": "NodePort", "port": 5443, "nodePort": 30443}},
    {"name": "ghcr", "remoteurl": "https://ghcr.io"}]})


def every_option(*extra: str, version: str = NEWEST) -> list[dict]:
    return template(EVERY_OPTION, "--kube-version", version, *MONITORING, *extra)


def strict(schema: dict) -> dict:
    """A CRD schema as an API server with strict field validation applies it: a field the
    schema does not declare is an error (metadata excepted: the API server checks it itself)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) if k != "metadata" else v for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    return schema


def test_every_option_on_lints_and_validates_with_the_cluster_and_crd_schemas(tmp_path):
    import jsonschema

    out = helm("lint", "--strict", str(CHART_DIR), values=EVERY_OPTION)  # lint takes no --api-versions
    assert "0 chart(s) failed" in out
    for version in (OLDEST, NEWEST):
        manifests = every_option(version=version)
        validate([m for m in manifests if not m["apiVersion"].startswith("monitoring.coreos.com/")], version, tmp_path)
    kinds = {m["kind"]: m for m in manifests}
    assert {"Ingress", "ServiceAccount", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "Pod",
            "CronJob"} <= set(kinds)
    for kind, file in (("ServiceMonitor", "servicemonitor.v1.yaml"), ("PrometheusRule", "prometheusrule.v1.yaml")):
        schema = strict(yaml.safe_load((ROOT / "tests" / "crds" / file).read_text()))
        # Not checked against the metaschema: the CRDs' patterns are Go's (`(?i)` inside).
        jsonschema.Draft7Validator(schema).validate(kinds[kind])
    # Strictness is real: a field the CRD lacks is refused.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(strict(yaml.safe_load((ROOT / "tests" / "crds" / "servicemonitor.v1.yaml").read_text()))
                                   ).validate({**kinds["ServiceMonitor"], "spec": {**kinds["ServiceMonitor"]["spec"],
                                                                                    "endpoint": []}})


def test_every_option_lands_where_the_community_chart_puts_it():
    manifests = every_option()
    kinds = {m["kind"]: m for m in manifests}
    assert {m["metadata"]["namespace"] for m in manifests} == {"registry-system"}  # namespaceOverride, everywhere
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["metadata"]["annotations"] == {"example.com/owner": "platform"}
    assert pod["serviceAccountName"] == "registry" and pod["automountServiceAccountToken"] is False
    assert kinds["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/registry")
    assert kinds["ServiceAccount"]["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "system-cluster-critical"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert [c["name"] for c in pod["initContainers"]] == ["wait"]
    assert [c["name"] for c in pod["containers"]] == ["registry", "sidecar"]
    assert {"name": "scratch", "mountPath": "/scratch"} in pod["containers"][0]["volumeMounts"]
    assert {"name": "scratch", "emptyDir": {}} in pod["volumes"]
    assert kinds["PodDisruptionBudget"]["spec"] == {"minAvailable": 1, "selector": deployment["spec"]["selector"]}

    service = kinds["Service"]
    assert service["metadata"]["labels"]["team"] == "platform"
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"registry": "registry", "metrics": "debug"}
    rule = kinds["Ingress"]["spec"]["rules"][0]
    assert rule["host"] == "registry.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "registry", "port": {"number": 9005}}
    assert kinds["Ingress"]["spec"]["ingressClassName"] == "nginx"

    config_map = next(m for m in manifests if m["metadata"]["name"] == "registry-config")
    s3 = yaml.safe_load(config_map["data"]["config.yml"])["storage"]["s3"]
    assert (s3["chunksize"], s3["storageclass"], s3["keyid"], s3["multipartcopythresholdsize"]) == (
        20971520, "REDUCED_REDUNDANCY", "kms-key", 67108864)
    assert not {"accesskey", "secretkey"} & set(s3)  # the keys come from the Secret, as env

    monitor = kinds["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "30s"}]
    alerts = {r["alert"]: r["expr"] for r in kinds["PrometheusRule"]["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {"RegistryDown", "RegistryErrors", "RegistryStorageErrors"}
    assert all('namespace="registry-system", service="registry"' in expr for expr in alerts.values())
    assert 'code=~"5.."' in alerts["RegistryErrors"] and 'code="503"' in alerts["RegistryStorageErrors"]


def test_monitoring_objects_only_where_the_cluster_serves_their_api():
    kinds = [m["kind"] for m in template(EVERY_OPTION)]
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    off = chart.merged(EVERY_OPTION, {"metrics": {"enabled": False}})
    manifests = template(off, *MONITORING)
    assert not {"ServiceMonitor", "PrometheusRule"} & {m["kind"] for m in manifests}
    (service,) = [m for m in manifests if m["kind"] == "Service"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["registry"]


def test_probes_leave_the_storage_to_readiness():
    """Distribution answers / through its storage health check: only readiness may ask it.
    Liveness and startup ask the debug server, which answers while the process serves."""
    (deployment,) = [m for m in template(values_for("microk8s-minio.yaml")) if m["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"registry": 5000, "debug": 5001}
    for kind in ("livenessProbe", "startupProbe"):
        assert container[kind]["httpGet"] == {"path": "/debug/vars", "port": "debug", "scheme": "HTTP"}
        assert container[kind]["timeoutSeconds"] == 5
    assert container["readinessProbe"]["httpGet"] == {"path": "/", "port": "registry", "scheme": "HTTPS"}
    assert container["readinessProbe"]["timeoutSeconds"] == 5
    config = yaml.safe_load(next(m for m in template(values_for("microk8s-minio.yaml"))
                                 if m["kind"] == "ConfigMap")["data"]["config.yml"])
    assert config["http"]["debug"] == {"addr": ":5001", "prometheus": {"enabled": True, "path": "/metrics"}}


def restricted_violations(pod: dict) -> list[str]:
    """The Pod Security Standards' "restricted" profile (Kubernetes' own list of checks), for
    one pod spec: which checks fail."""
    found = []
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            found.append(f"volume {volume['name']}: {kinds - allowed_volumes}")
    if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        found.append("host namespaces")
    pod_context = pod.get("securityContext") or {}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        context, name = container.get("securityContext") or {}, container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities not dropped")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds {capabilities['add']}")
        if any(p.get("hostPort") for p in container.get("ports") or []):
            found.append(f"{name}: hostPort")
    return found


def test_the_registry_gc_and_test_pods_pass_the_restricted_profile():
    manifests = every_option()
    pods = {"Deployment": next(m for m in manifests if m["kind"] == "Deployment")["spec"]["template"]["spec"],
            "CronJob": next(m for m in manifests if m["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            "helm test Pod": next(m for m in manifests if m["kind"] == "Pod")["spec"]}
    assert {what: restricted_violations(pod) for what, pod in pods.items()} == {what: [] for what in pods}
    # The check can fail: the node-trust DaemonSet needs a hostPath and root, and it says so.
    node_trust = next(m for m in manifests if m["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert any("hostPath" in v for v in restricted_violations(node_trust))


@pytest.mark.parametrize(("setting", "named"), [
    ("replicas=2", "replicas: use replicaCount"),
    ("tlsSecret=x", "tlsSecret: use tlsSecretName"),
    ("persistence.enable=true", "persistence.enable: use persistence.enabled"),
    ("persistence.storageclass=fast", "persistence.storageclass: use persistence.storageClass"),
    ("service.loadBalancerIp=192.168.86.201", "service.loadBalancerIp: use service.loadBalancerIP"),
    ("s3.skipverify=true", "s3.skipverify: use s3.skipVerify"),
    ("secrets.htpasswd=user:hash", "crflow references an existing Secret: secrets.htpasswdSecretName"),
    ("secrets.haSharedSecret=x", "crflow references an existing Secret: secrets.haSharedSecretName"),
    ("secrets.s3.accessKey=x", "crflow references an existing Secret: secrets.s3.secretRef"),
    ("configData.storage.s3.chunksize=1", "configData.storage.s3: set the S3 options as s3.<option> (chunksize)"),
    ("service.nodePort=80", "nodePort"),
    ("garbageCollect.schedule=bogus", "garbageCollect"),
    ("resources.limit.cpu=1", "limit"),
    ("ingres.enabled=true", "ingres"),
])
def test_a_typo_or_a_community_name_fails_with_the_key_named(setting, named):
    for binary in (helm_executable(), str(ROOT / ".bin" / "helm3")):
        result = subprocess.run([binary, "template", "r", str(CHART_DIR), "--set", setting], capture_output=True, text=True)
        assert result.returncode == 1 and named in result.stderr, (binary, result.stderr)
        assert len(result.stderr.strip().splitlines()) <= 4, result.stderr  # the one message, not a template dump


@pytest.mark.parametrize(("values", "says"), [
    ({"replicaCount": 2, "secrets": {"haSharedSecretName": "h"}},
     "replicaCount: 2 replicas on filesystem storage would each see different images; use storage s3, or a "
     "ReadWriteMany claim"),
    ({"replicaCount": 2, "secrets": {"haSharedSecretName": "h"}, "persistence": {"enabled": True}},
     "2 replicas on filesystem storage"),
    ({"replicaCount": 2, "storage": "s3", "s3": {"bucket": "b"}},
     "replicaCount: 2 replicas need one http.secret, or an upload started on one pod fails on another; set "
     "secrets.haSharedSecretName"),
])
def test_an_ha_mistake_fails_with_what_to_do(values, says):
    result = subprocess.run([helm_executable(), "template", "r", str(CHART_DIR), "--values", "-"],
                            input=json.dumps(values), capture_output=True, text=True)
    assert result.returncode == 1 and says in result.stderr, result.stderr


def test_two_replicas_on_a_readwritemany_claim_render_with_a_disruption_budget():
    manifests = template({"replicaCount": 2, "secrets": {"haSharedSecretName": "h"},
                          "persistence": {"enabled": True, "accessMode": "ReadWriteMany"}})
    assert "PodDisruptionBudget" in {m["kind"] for m in manifests}
    assert "PodDisruptionBudget" not in {m["kind"] for m in template({})}  # one replica: no budget to block drains


def test_a_recreate_strategy_renders_without_rolling_update(tmp_path):
    manifests = template({"updateStrategy": {"type": "Recreate"}})
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    validate(manifests, NEWEST, tmp_path)


def test_the_chart_readme_is_current_and_helm_shows_it(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart_readme.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shown = helm("show", "readme", str(CHART_DIR))
    assert "| `s3.chunksize` | `10485760` |" in shown and "Coming from the community docker-registry chart" in shown
    # The check can fail: a value documented in values.yaml but not in the table is stale.
    stale = tmp_path / "README.md"
    stale.write_text((CHART_DIR / "README.md").read_text().replace("| `s3.chunksize`", "| `s3.chunk`"))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import chart_readme
    finally:
        sys.path.pop(0)
    assert chart_readme.rendered(stale.read_text(), (CHART_DIR / "values.yaml").read_text()) != stale.read_text()


def test_chart_metadata_is_complete():
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert {"home", "sources", "maintainers", "icon", "kubeVersion"} <= set(meta)
    shown = yaml.safe_load(helm("show", "chart", str(CHART_DIR)))
    assert shown["kubeVersion"] == meta["kubeVersion"] and shown["sources"]


def test_the_work_pools_job_and_the_prefect_worker_pass_the_restricted_profile():
    """deployments/: the Job each flow run becomes, and the worker's own pod."""
    template = json.loads((ROOT / "deployments" / "base-job-template.json").read_text())
    job = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    worker = next(d for d in yaml.safe_load_all((ROOT / "deployments" / "worker.yaml").read_text())
                  if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {"job": restricted_violations(job), "worker": restricted_violations(worker)} == {"job": [], "worker": []}
