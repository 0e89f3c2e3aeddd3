"""The test cluster itself, and crflow's first run on it: kube-apiserver, controller-manager,
scheduler, kubelet and kube-proxy built from Debian's `kubernetes` source package, with
Debian's etcd, containerd, runc and CNI plugins (tests/cluster.py). REAL: nothing here is
emulated; the apiserver, the kubelet and containerd are the judges."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from cluster import GATEWAY, NODE, REGISTRY_IMAGE, alive, kubectl
from crflow.tasks.workloads import PULL_TEST_NAMESPACE, pull_test_name

pytestmark = pytest.mark.kubernetes


def test_the_node_is_a_real_kubernetes_1_20(k8s):
    node = k8s
    print(f"the node was Ready {node.started_in:.1f} s after the cluster's start")
    assert json.loads(kubectl(node, "version", "-o", "json").stdout)["serverVersion"]["gitVersion"] == "v1.20.2"
    for name in ("apiserver", "kubelet", "containerd", "controller-manager", "scheduler", "proxy", "etcd"):
        assert alive(node, name), name
    nodes = json.loads(kubectl(node, "get", "nodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == [NODE]
    # The kubelet's start-up sysctls are the machine's again.
    for sysctl in ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"):
        assert (Path("/proc/sys") / sysctl).read_text().strip() == node.sysctls[sysctl]


def test_a_pod_runs_the_locally_built_registry_image_and_answers_on_the_bridge(k8s):
    from cluster import using

    node = k8s
    with using(node.root):
        smoke_pod(node)


def smoke_pod(node) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "registry-smoke", "namespace": "default"},
           "spec": {"containers": [{"name": "registry", "image": REGISTRY_IMAGE, "imagePullPolicy": "Never",
                                    "command": ["/bin/sh", "-c", "printf 'version: 0.1\\nstorage:\\n  filesystem:\\n"
                                                "    rootdirectory: /tmp/r\\nhttp:\\n  addr: \"0.0.0.0:5000\"\\n' "
                                                "> /tmp/c.yml && exec /bin/registry serve /tmp/c.yml"],
                                    "securityContext": {"runAsUser": 1000, "runAsGroup": 1000}}],
                    "automountServiceAccountToken": False}}
    subprocess.run([str(node.bin_dir / "kubectl"), f"--kubeconfig={node.kubeconfig}", "apply", "-f", "-"],
                   input=json.dumps(pod), capture_output=True, text=True, check=True, timeout=60)
    kubectl(node, "wait", "--for=condition=Ready", "pod/registry-smoke", "--timeout=120s")
    ip = kubectl(node, "get", "pod", "registry-smoke", "-o", "jsonpath={.status.podIP}").stdout
    assert ip.startswith(GATEWAY.rsplit(".", 1)[0] + ".")
    deadline = time.monotonic() + 30
    code = ""
    while time.monotonic() < deadline and code != "200":
        code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{ip}:5000/v2/"],
                              capture_output=True, text=True, timeout=10).stdout
        time.sleep(0.2)
    assert code == "200"
    assert "listening on" in kubectl(node, "logs", "registry-smoke").stdout  # the kubelet serves the log
    kubectl(node, "delete", "pod", "registry-smoke", "--grace-period=1")


def test_crflow_installs_verifies_and_uninstalls_on_the_real_node(k8s, make_cluster_site, crflow, tmp_path):
    """The runbook's filesystem variant (a hostPath PV on the node), with the worker's token."""
    from conftest import oci_layout, skopeo

    data = tmp_path / "data"
    site = make_cluster_site(storage={"kind": "pvc", "host_path": {"path": str(data), "node": NODE}})
    site.settings["chart"]["values"]["garbageCollect"] = {"enabled": True}
    site.write()
    namespace = site.namespace
    # doctor reads the cluster's version with the worker's token before anything is made.
    assert re.search(r"^ok\s+cluster\s+Kubernetes v1\.20\.2 \(kubeconfig ", crflow("doctor", "-c", str(site.path)).stdout,
                     re.M)
    crflow("install", "-c", str(site.path))
    assert (data.stat().st_uid, data.stat().st_gid) == (1000, 1000)  # the hostPath the kubelet made, given over
    # Rendered for the cluster's own version, the chart is what the cluster holds (a CronJob at
    # batch/v1beta1 on 1.20): an upgrade's diff finds nothing to change.
    assert "dry run: 0 objects would change" in crflow("upgrade", "-c", str(site.path), "--dry-run").stdout
    assert site.kubectl("-n", namespace, "get", "cronjobs.v1beta1.batch", "-o", "name").stdout.strip()
    # verify's last check: a pod on the node pulls the pushed image with the pull Secret, trusting
    # the CA only through the certs.d the node-trust DaemonSet wrote.
    crflow("verify", "-c", str(site.path))
    assert (k8s.certs_d / site.server / "hosts.toml").exists()
    client = tmp_path / "client"
    crflow("export-client", "-c", str(site.path), "--out", str(client))
    oci_layout(tmp_path / "layout", "v1")
    ref = f"docker://{site.server}/team/app:v1"
    skopeo("copy", "--dest-authfile", str(client / "auth.json"), "--dest-cert-dir", str(client),
           f"oci:{tmp_path / 'layout'}:v1", ref)
    skopeo("inspect", "--authfile", str(client / "auth.json"), "--cert-dir", str(client), ref)
    assert list(data.rglob("docker/registry/v2/repositories/team/app"))  # on the node's disk, through the claim
    # The node-trust pod's PID 1 ends on SIGTERM (it ignored it, and every stop took the whole
    # grace period): the kubelet restarts it, and it says it exited 0.
    trust_pod = site.kubectl("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/component=node-trust",
                             "-o", "jsonpath={.items[0].metadata.name}").stdout
    signalled = site.kubectl("-n", namespace, "exec", trust_pod, "--", "kill", "-TERM", "1", check=False)
    assert signalled.returncode in (0, 137), signalled.stderr  # 137: the exec ended with the container it stopped
    deadline, last = time.monotonic() + 90, {}
    while time.monotonic() < deadline and "terminated" not in last:
        status = json.loads(site.kubectl("-n", namespace, "get", "pod", trust_pod, "-o", "json").stdout)
        last = status["status"]["containerStatuses"][0].get("lastState") or {}
        time.sleep(0.5)
    assert last["terminated"]["exitCode"] == 0, last

    crflow("uninstall", "-c", str(site.path), "--yes")
    assert not (k8s.certs_d / site.server).exists()  # node trust took its files off the node first
    # Nothing crflow made that holds the login stays: verify's own pull Secret included.
    left = site.kubectl("-n", PULL_TEST_NAMESPACE, "get", "secret", pull_test_name(namespace, "registry"), check=False)
    assert left.returncode != 0 and "NotFound" in left.stderr


def test_a_load_balancer_nobody_serves_is_named_not_waited_on(make_cluster_site, crflow, tmp_path):
    site = make_cluster_site(storage={"kind": "pvc", "host_path": {"path": str(tmp_path / "data"), "node": NODE}})
    site.settings["registry"]["service_type"] = "LoadBalancer"  # the runbook's, on a cluster with no MetalLB
    site.settings["node_trust"] = {"enabled": False}
    site.write()
    result = crflow("install", "-c", str(site.path), check=False)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "has no external IP after 60 s (EXTERNAL-IP <pending>)" in line, line
