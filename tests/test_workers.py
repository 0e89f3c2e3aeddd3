"""Flows that run on any worker: the cluster holds the site's state, so runs from fresh working
directories and from a Kubernetes work pool's Job carry on the same site. (The state's own
rules, the earlier layout's migration and the cache in a bucket: tests/test_cluster_state.py.)

On the test cluster (tests/cluster.py: a real Kubernetes 1.20 node). REAL: the Prefect worker
is prefect-kubernetes's, with the token of deployments/worker.yaml's ServiceAccount (its kopf
observer off); it makes the Job from deployments/base-job-template.json; the Job controller
and the kubelet run its pod, as crflow-worker, with the in-cluster token. The pod runs the
flow image (deployments/Dockerfile, built by buildah from this tree's wheel: tests/shipping.py),
which the kubelet pulls from the registry crflow installed on the cluster, trusting it through
the node trust and logging in with the pull Secret crflow put in the Job's namespace: the
whole loop a user runs. The one change to the shipped template: the pod is on the host's
network, to reach the session's Prefect server on loopback.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client

from cluster import NODE, kubectl
from conftest import MINIO_KEYS, ROOT, fingerprint, oci_layout, secret_text, skopeo, token_kubeconfig
from servers import BIN

pytestmark = pytest.mark.kubernetes


def generations(site) -> dict:
    """The generations the cluster's state Secret holds (none saved yet: generation 0)."""
    data = site.core.read_namespaced_secret("registry-crflow-state", site.namespace).data
    return json.loads(base64.b64decode(data["generations.json"])) if "generations.json" in data else {"credentials": 0}


def wait_for_run(api: str, run_id: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).raise_for_status().json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def job_template(path: Path, pull_secret: str) -> Path:
    """deployments/base-job-template.json as a user pulling the flow image from crflow's own
    registry has it (the pull Secret named), on the host's network (the Prefect server here is
    on loopback); the pod may wait for its image as long as a first pull takes."""
    template = json.loads((ROOT / "deployments" / "base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    pod["imagePullSecrets"] = [{"name": pull_secret}]
    template["variables"]["properties"]["pod_watch_timeout_seconds"]["default"] = 300
    path.write_text(json.dumps(template))
    return path


def push_flow_image(site, tmp_path: Path) -> str:
    """The flow image, built from this tree's wheel, pushed into the site's registry with the
    client files crflow wrote: its name there."""
    from shipping import Unavailable, build_wheel, check_tools, flow_image

    try:
        check_tools()
    except Unavailable as why:
        pytest.skip(f"the flow image cannot be built here: {why}")
    image = flow_image(build_wheel(tmp_path / "wheel"))
    pushed = f"{site.server}/crflow/flow:{image.rsplit(':', 1)[1]}"
    skopeo("copy", "--dest-authfile", str(site.client / "auth.json"), "--dest-cert-dir", str(site.client),
           f"containers-storage:{image}", f"docker://{pushed}")
    return pushed


def test_fresh_directories_and_a_kubernetes_workers_job_carry_on_the_same_site(
        crflow, cluster_site, tmp_path, prefect_api, prefect_home):
    from test_secrets import assert_nowhere

    site, core = cluster_site, cluster_site.core
    namespace = site.namespace
    # The Jobs' namespace gets the pull Secret; the registry's blobs go to a hostPath PV (the
    # flow image is large for moto's memory).
    site.settings["pull_secrets"] = {"namespaces": ["crflow"]}
    site.settings["storage"] = {"kind": "pvc", "host_path": {"path": str(tmp_path / "data"), "node": NODE}}
    site.write()
    runs = [crflow("install", "-c", str(site.path))]
    flow_image = push_flow_image(site, tmp_path)
    key = (site.state / "result.key").read_text().strip()
    ca = fingerprint(secret_text(core, namespace, "registry-ca", "ca.crt"))
    first_login = secret_text(core, namespace, "registry-login", "password")
    assert generations(site)["credentials"] == 0

    def elsewhere(name: str) -> Path:
        """The same site file, with a state_dir nothing has run from."""
        folder = tmp_path / name
        folder.mkdir()
        path = folder / "site.yaml"
        path.write_text(yaml.safe_dump({**site.settings, "state_dir": str(folder / "state")}))
        return path

    # A second working directory, with no state: rotate, then verify, with the result key only.
    second, with_key = elsewhere("second"), {"CRFLOW_RESULT_KEY": key}
    runs.append(crflow("rotate-credentials", "-c", str(second), "--grace", "0", env=with_key))
    runs.append(crflow("verify", "-c", str(second), env=with_key))
    assert generations(site)["credentials"] == 1

    # Through a Kubernetes work pool: the worker makes a Job per run. First with a wrong key in the
    # key Secret: install stops before anything is made. Then, with the right one, verify.
    from cryptography.fernet import Fernet

    # The Prefect worker's own account, as deployments/worker.yaml makes it (its Deployment aside:
    # the worker runs here); the Jobs go to the crflow namespace, which worker-rbac.yaml made.
    accounts = [d for d in yaml.safe_load_all((ROOT / "deployments" / "worker.yaml").read_text())
                if d and d["kind"] != "Deployment"]
    kubectl(site.node, "apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in accounts))
    worker_kubeconfig = token_kubeconfig(site.node, "crflow", "prefect-worker")
    for old in ("secret/crflow-result-key", "configmap/crflow-sites"):  # one test uses them: a rerun's leftovers
        kubectl(site.node, "-n", "crflow", "delete", old, "--ignore-not-found")
    core.create_namespaced_secret("crflow", client.V1Secret(metadata=client.V1ObjectMeta(name="crflow-result-key"),
                                                            string_data={"result.key": Fernet.generate_key().decode()}))
    third = elsewhere("third")
    in_job = {**yaml.safe_load(third.read_text()), "state_dir": "/var/lib/crflow/state"}
    in_job["cluster"] = {k: v for k, v in in_job["cluster"].items() if k != "kubeconfig"}  # the pod's own token
    core.create_namespaced_config_map("crflow", client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="crflow-sites"), data={"site.yaml": yaml.safe_dump(in_job)}))
    pool = f"crflow-k8s-{site.namespace}"
    deployed = crflow("deploy", "-c", str(third), "--pool", pool, "--pool-type", "kubernetes", "--image", flow_image,
                      "--job-template", str(job_template(tmp_path / "job-template.json", "registry-pull")))
    assert "bound to site.yaml" in deployed.stdout

    def through_the_worker(flow: str) -> tuple[dict, str]:
        """Start a run of the site's `flow` deployment, let the worker make its Job, and wait for
        the run to end: (the run, its Job pod's log)."""
        started = subprocess.run([str(BIN / "prefect"), "deployment", "run", f"{flow}/registry@{site.server}"],
                                 env=crflow.env, capture_output=True, text=True, timeout=120, check=True)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
        worker = subprocess.run(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "kubernetes", "--run-once"],
            env={**crflow.env, "KUBECONFIG": str(worker_kubeconfig),
                 "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "worker"),
                 "PREFECT_WORKER_QUERY_SECONDS": "1"},
            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        assert "Kubernetes job" in worker.stderr + worker.stdout, worker.stderr[-3000:]
        run = wait_for_run(prefect_api, run_id, 300)
        jobs = kubectl(site.node, "-n", "crflow", "get", "jobs", "-l", f"prefect.io/flow-run-id={run_id}",
                       "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
        logs = kubectl(site.node, "-n", "crflow", "logs", f"job/{jobs[0]}", check=False) if jobs else None
        return run, logs.stdout if logs and logs.stdout else f"(no Job pod log: {jobs} {logs and logs.stderr})"

    def secrets() -> dict[str, str]:
        return {s.metadata.name: s.metadata.resource_version for s in core.list_namespaced_secret(namespace).items
                if s.type != "kubernetes.io/service-account-token"}

    before = secrets()
    refused, log = through_the_worker("install")
    assert refused["state"]["type"] == "FAILED" and "wrong result key" in log, log[-4000:]
    assert secrets() == before  # nothing made, nothing written

    core.patch_namespaced_secret("crflow-result-key", "crflow", {"stringData": {"result.key": key}})
    run, log = through_the_worker("verify-push-pull")
    assert run["state"]["type"] == "COMPLETED", log[-4000:]
    assert "Downloading flow code" not in log  # the deployment's pull step: no copy of the image's files per run
    # The kubelet ran the flow image, pulled from crflow's registry.
    job_name = kubectl(site.node, "-n", "crflow", "get", "jobs", "-l", f"prefect.io/flow-run-id={run['id']}",
                       "-o", "jsonpath={.items[0].metadata.name}").stdout
    pod = core.list_namespaced_pod("crflow", label_selector=f"job-name={job_name}").items[0]
    assert pod.spec.containers[0].image == flow_image and pod.status.container_statuses[0].image_id
    assert run["parameters"] == {"site_file": "site.yaml"}  # the file's name in the mounted ConfigMap, nothing more

    # The Job as the worker made it: the key only by reference; no secret in it.
    job = next(j for j in client.BatchV1Api(core.api_client).list_namespaced_job("crflow").items
               if j.metadata.labels["prefect.io/flow-run-id"] == run["id"])
    manifest = core.api_client.sanitize_for_serialization(job)
    env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "CRFLOW_RESULT_KEY", "valueFrom": {"secretKeyRef": {"name": "crflow-result-key",
                                                                       "key": "result.key"}}} in env
    assert manifest["spec"]["template"]["spec"]["serviceAccountName"] == "crflow-worker"

    # The same CA; the login moved on by exactly one generation, and it pushes and pulls.
    assert fingerprint(secret_text(core, namespace, "registry-ca", "ca.crt")) == ca
    assert generations(site) == {**generations(site), "credentials": 1, "rotating_to": None}
    exported = tmp_path / "exported"
    crflow("export-client", "-c", str(elsewhere("fourth")), "--out", str(exported))
    rotated = json.loads((exported / "auth.json").read_text())["auths"][site.server]["auth"]
    assert base64.b64decode(rotated).decode().split(":", 1)[1] != first_login
    layout = tmp_path / "layout"
    oci_layout(layout)
    image = f"docker://{site.server}/workers/check:1"
    skopeo("copy", "--dest-authfile", str(exported / "auth.json"), "--dest-cert-dir", str(exported),
           f"oci:{layout}:latest", image)
    skopeo("copy", "--src-authfile", str(exported / "auth.json"), "--src-cert-dir", str(exported), image,
           f"oci:{tmp_path / 'pulled'}:latest")

    secrets = {"result key": key, "MinIO secret key": MINIO_KEYS["secretkey"], "first password": first_login,
               "rotated password": secret_text(core, namespace, "registry-login", "password")}
    assert_nowhere(secrets, runs, site, prefect_api, prefect_home)
    dumped = json.dumps(manifest)
    assert not any(value in dumped for value in secrets.values())

