"""The real Kubernetes 1.20 node (tests/cluster.py): kube-apiserver, controller-manager,
scheduler, kubelet, kube-proxy built from Debian's `kubernetes` source package, with Debian's
etcd, containerd, runc and CNI plugins. REAL: nothing here is emulated; the apiserver, the
kubelet and containerd are the judges.

`pytest -m node` runs just these. scripts/setup.sh --test builds the binaries once (about 13
minutes on 2 cores) into a cache outside the checkout; the rest of the kubernetes suite still
runs against the emulated API server while it moves onto this node."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from cluster import GATEWAY, NODE, REGISTRY_IMAGE, SYSCTLS, Cluster, Unavailable

pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    try:
        cluster = Cluster.start(tmp_path_factory.mktemp("k8s"))
    except Unavailable as why:
        pytest.skip(str(why))
    print(f"the node was Ready {cluster.started_in:.1f} s after the cluster's start")
    yield cluster
    before = dict(cluster.sysctls)
    cluster.stop()
    after = {s: (Path("/proc/sys") / s).read_text().strip() for s in SYSCTLS if (Path("/proc/sys") / s).exists()}
    assert after == before, "a sysctl the cluster changed was not set back"


def kubectl(node: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(node.bin_dir / "kubectl"), f"--kubeconfig={node.kubeconfig}", *args],
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result


def test_the_node_is_a_real_kubernetes_1_20(node):
    assert json.loads(kubectl(node, "version", "-o", "json").stdout)["serverVersion"]["gitVersion"] == "v1.20.2"
    for name in ("apiserver", "kubelet", "containerd", "controller-manager", "scheduler", "proxy"):
        assert node.processes[name].poll() is None, name
    nodes = json.loads(kubectl(node, "get", "nodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == [NODE]
    # The kubelet's start-up sysctls are the machine's again.
    for sysctl in ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"):
        assert (Path("/proc/sys") / sysctl).read_text().strip() == node.sysctls[sysctl]


def test_a_pod_runs_the_locally_built_registry_image_and_answers_on_the_bridge(node):
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


def test_crflow_installs_verifies_and_uninstalls_on_the_real_node(node, crflow, tmp_path):
    import yaml

    from conftest import oci_layout, skopeo

    data = tmp_path / "data"
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({
        "target": "kubernetes", "state_dir": str(tmp_path / "state"),
        "cluster": {"kubeconfig": str(node.kubeconfig), "helm_timeout_seconds": 180},
        "registry": {"ips": ["127.0.0.1"], "dns_names": [], "port": 30500, "service_type": "NodePort"},
        "storage": {"kind": "pvc", "host_path": {"path": str(data), "node": NODE}},
        "node_trust": {"host_dir": str(node.certs_d)},
        "chart": {"values": {"image": {"repository": REGISTRY_IMAGE.split(":")[0], "tag": REGISTRY_IMAGE.split(":")[1],
                                       "pullPolicy": "Never"},
                             "garbageCollect": {"enabled": True}}}}))
    crflow("install", "-c", str(site))
    assert (data.stat().st_uid, data.stat().st_gid) == (1000, 1000)  # the hostPath the kubelet made, given over
    # Rendered for the cluster's own version, the chart is what the cluster holds (a CronJob at
    # batch/v1beta1 on 1.20): an upgrade's diff finds nothing to change.
    assert "dry run: 0 objects would change" in crflow("upgrade", "-c", str(site), "--dry-run").stdout
    assert kubectl(node, "-n", "container-registry", "get", "cronjobs.v1beta1.batch", "-o", "name").stdout.strip()
    # verify's last check: a pod on the node pulls the pushed image with the pull Secret, trusting
    # the CA only through the certs.d the node-trust DaemonSet wrote.
    crflow("verify", "-c", str(site))
    assert (node.certs_d / "127.0.0.1:30500" / "hosts.toml").exists()
    client = tmp_path / "client"
    crflow("export-client", "-c", str(site), "--out", str(client))
    oci_layout(tmp_path / "layout", "v1")
    ref = "docker://127.0.0.1:30500/team/app:v1"
    skopeo("copy", "--dest-authfile", str(client / "auth.json"), "--dest-cert-dir", str(client),
           f"oci:{tmp_path / 'layout'}:v1", ref)
    skopeo("inspect", "--authfile", str(client / "auth.json"), "--cert-dir", str(client), ref)
    # The node-trust pod's PID 1 ends on SIGTERM (it ignored it, and every stop took the whole
    # grace period): the kubelet restarts it, and it says it exited 0.
    trust_pod = kubectl(node, "-n", "container-registry", "get", "pods", "-l", "app.kubernetes.io/component=node-trust",
                        "-o", "jsonpath={.items[0].metadata.name}").stdout
    kubectl(node, "-n", "container-registry", "exec", trust_pod, "--", "kill", "-TERM", "1")
    deadline, last = time.monotonic() + 90, {}
    while time.monotonic() < deadline and "terminated" not in last:
        status = json.loads(kubectl(node, "-n", "container-registry", "get", "pod", trust_pod, "-o", "json").stdout)
        last = status["status"]["containerStatuses"][0].get("lastState") or {}
        time.sleep(0.5)
    assert last["terminated"]["exitCode"] == 0, last

    crflow("uninstall", "-c", str(site), "--yes")
    assert not (node.certs_d / "127.0.0.1:30500").exists()  # node trust took its files off the node first
    # Nothing crflow made that holds the login stays: verify's own pull Secret included.
    left = kubectl(node, "-n", "crflow-verify", "get", "secret", "crflow-verify-pull", check=False)
    assert left.returncode != 0 and "NotFound" in left.stderr


def test_a_load_balancer_nobody_serves_is_named_not_waited_on(node, crflow, tmp_path):
    import yaml

    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({  # the runbook's LoadBalancer, on a cluster with no MetalLB
        "target": "kubernetes", "state_dir": str(tmp_path / "state"), "release": "lb",
        "cluster": {"kubeconfig": str(node.kubeconfig), "helm_timeout_seconds": 120},
        "registry": {"ips": ["127.0.0.3"], "dns_names": [], "port": 5443, "service_type": "LoadBalancer"},
        "storage": {"kind": "pvc", "host_path": {"path": str(tmp_path / "data"), "node": NODE}},
        "node_trust": {"enabled": False},
        "chart": {"values": {"image": {"repository": REGISTRY_IMAGE.split(":")[0], "tag": REGISTRY_IMAGE.split(":")[1],
                                       "pullPolicy": "Never"}}}}))
    try:
        result = crflow("install", "-c", str(site), check=False)
        line = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "has no external IP after 60 s (EXTERNAL-IP <pending>)" in line, line
    finally:
        crflow("uninstall", "-c", str(site), "--yes", check=False)
