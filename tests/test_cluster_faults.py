"""Faults of the cluster itself, on the test cluster (tests/cluster.py: a real Kubernetes 1.20
node): the apiserver frozen (SIGSTOP), etcd frozen, the kubelet killed in the middle of a
rollout (its supervisor starts it again, as systemd would), the node gone NotReady. Each holds the cluster alone.
crflow's runs end within their bounds (every API call has a timeout; helm has its own), and
a rerun converges. REAL: every component; EMULATED: moto stands in for MinIO."""

from __future__ import annotations

import signal
import time

import pytest
from test_rotate import push
from test_upgrade_kubernetes import revisions, set_values

from cluster import NODE, REGISTRY_IMAGE_NEXT, alive, signal_component
from crflow.oci import Registry

pytestmark = [pytest.mark.kubernetes, pytest.mark.cluster_alone]


def wait_until(check, seconds: float, what: str, process=None) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        assert process is None or process.poll() is None, f"crflow ended before {what}"
        time.sleep(0.2)


def frozen(site, component: str, seconds: float) -> None:
    signal_component(site.node, component, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the outage's length, not a wait for anything
    finally:
        signal_component(site.node, component, signal.SIGCONT)


def test_an_install_outlives_a_frozen_apiserver_and_a_rerun_changes_nothing(crflow, cluster_site):
    site = cluster_site
    process = crflow.popen("install", "-c", str(site.path))
    secrets = lambda: [s.metadata.name for s in site.core.list_namespaced_secret(site.namespace).items]  # noqa: E731
    wait_until(lambda: "registry-tls" in secrets(), 180, "TLS Secret", process)
    frozen(site, "apiserver", 10)
    output = process.communicate(timeout=400)[0]
    assert process.returncode == 0, output[-3000:]
    crflow("install", "-c", str(site.path))
    assert revisions(site) == [(1, "deployed")]  # the rerun found everything in place


def test_a_rotation_through_an_etcd_outage_ends_and_a_rerun_makes_exactly_one_new_login(crflow, cluster_site):
    site = cluster_site
    crflow("install", "-c", str(site.path))
    old = site.login()
    process = crflow.popen("rotate-credentials", "-c", str(site.path), "--grace", "0")
    wait_until(lambda: (site.state / "rotation").exists(), 120, "rotation under way", process)
    frozen(site, "etcd", 15)
    output = process.communicate(timeout=600)[0]  # within its bounds, whichever way it ends
    assert alive(site.node, "etcd") and alive(site.node, "apiserver")
    if process.returncode != 0:  # then the rerun finishes it, with the same new login
        assert "crflow: error:" in output.strip().splitlines()[-1], output[-3000:]
        crflow("rotate-credentials", "-c", str(site.path), "--grace", "0")
    new = site.login()
    assert new[0] != old[0]
    with Registry.from_bundle(site.url, site.client) as registry:
        registry.ping()  # the new login is the one the registry takes
    crflow("verify", "-c", str(site.path))


def test_a_kubelet_killed_in_the_middle_of_a_rollout_comes_back_and_the_upgrade_passes_verify(crflow, cluster_site):
    site = cluster_site
    crflow("install", "-c", str(site.path))
    digest, rollouts = push(site), site.rollouts()
    set_values(site, {"image": {**site.settings["chart"]["values"]["image"], "tag": REGISTRY_IMAGE_NEXT.split(":")[1]}})
    old_pid = site.node.pids.get("kubelet")
    process = crflow.popen("upgrade", "-c", str(site.path))
    wait_until(lambda: site.rollouts() > rollouts, 180, "rollout", process)
    signal_component(site.node, "kubelet", signal.SIGKILL)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0 and "verify passed" in output, output[-3000:]
    assert revisions(site)[-1] == (2, "deployed")
    assert alive(site.node, "kubelet") and old_pid is not None  # the supervisor started a new one
    with Registry.from_bundle(site.url, site.client) as registry:
        assert registry.pull_image("team/app", digest)


def test_a_node_gone_not_ready_makes_status_unhealthy_in_one_line_and_it_recovers(crflow, cluster_site):
    """The kubelet frozen: after the node controller's default 40 s grace (the test cluster keeps
    Kubernetes' defaults here; shorter ones made the node NotReady inside other fault tests'
    freezes), it marks the node NotReady and its pods unready, the
    endpoints controller takes the registry out of its Service, and kube-proxy stops sending it
    anything. `crflow status` says so; once the kubelet runs again, it is healthy again."""
    site = cluster_site
    crflow("install", "-c", str(site.path))

    def node_ready() -> str:
        return site.kubectl("get", "node", NODE, "-o",
                            'jsonpath={.status.conditions[?(@.type=="Ready")].status}').stdout

    status = lambda: crflow("status", "-c", str(site.path), check=False)  # noqa: E731
    signal_component(site.node, "kubelet", signal.SIGSTOP)
    try:
        wait_until(lambda: node_ready() == "Unknown", 90, "NotReady node")
        wait_until(lambda: status().returncode == 3, 90, "unhealthy status")
        answer = status()
        line = answer.stdout.splitlines()[0]  # the finding; the exit code's name follows on stderr
        assert site.url in line and "not answering" in line, line
    finally:
        signal_component(site.node, "kubelet", signal.SIGCONT)
    wait_until(lambda: node_ready() == "True", 90, "Ready node")
    wait_until(lambda: status().returncode == 0, 120, "healthy status")
