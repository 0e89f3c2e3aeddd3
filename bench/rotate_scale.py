"""Propagation of a rotated login to many namespaces on a real Kubernetes 1.20 apiserver: crflow's
pull Secret task (put_pull_secrets: list by selector, read, write, ServiceAccount) against the
peer `kubectl apply` of the same Secrets from one file (what a person would script).

    .venv/bin/python bench/rotate_scale.py [--counts 10,100,1000] [--service-account]

For each count: N labelled namespaces; crflow writes a new dockerconfigjson into each (they
all hold an older one first, so every Secret really changes); kubectl applies the same N
Secrets. Prints seconds, ms per namespace and the ratio crflow/kubectl. The issue's target:
1,000 namespaces in <= 20 s. REAL: the test cluster of tests/cluster.py (kube-apiserver and
etcd built from Debian's packages, on this machine; it needs root), started for the run.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from pydantic import SecretStr  # noqa: E402

from cluster import Cluster  # noqa: E402
from crflow.tasks.consumers import put_pull_secrets  # noqa: E402
from crflow.tasks.kubeapi import KubeAccess, api_client  # noqa: E402

SELECTOR = "bench-rotation=true"


def docker_config(generation: int) -> str:
    auth = base64.b64encode(f"crflow-bench-{generation}:password-{generation}".encode()).decode()
    return json.dumps({"auths": {"192.168.86.201:9005": {"auth": auth}}})


def make_namespaces(kubeconfig: Path, prefix: str, count: int) -> None:
    from kubernetes import client

    with api_client(KubeAccess(kubeconfig=str(kubeconfig))) as api:
        core = client.CoreV1Api(api)
        for i in range(count):
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
                name=f"{prefix}-{i:04d}", labels={"bench-rotation": "true", "bench-set": prefix})))


def kubectl_apply(kubeconfig: Path, prefix: str, count: int, generation: int, work: Path) -> float:
    data = base64.b64encode(docker_config(generation).encode()).decode()
    manifests = [{"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                  "metadata": {"name": "registry-pull-kubectl", "namespace": f"{prefix}-{i:04d}"},
                  "data": {".dockerconfigjson": data}} for i in range(count)]
    path = work / f"{prefix}-{generation}.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    started = time.perf_counter()
    subprocess.run([str(ROOT / ".bin" / "kubectl"), "--kubeconfig", str(kubeconfig), "apply", "-f", str(path)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,100,1000")
    parser.add_argument("--service-account", action="store_true", help="also list the Secret in default ServiceAccounts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cluster = Cluster.start(work / "cluster")
        kubeconfig = cluster.kubeconfig
        try:
            kube = KubeAccess(kubeconfig=str(kubeconfig))
            print(f"{'namespaces':>10} {'crflow s':>9} {'ms/ns':>7} {'kubectl s':>10} {'ms/ns':>7} {'ratio':>6}")
            for count in (int(c) for c in args.counts.split(",")):
                prefix = f"bench{count}"
                make_namespaces(kubeconfig, prefix, count)
                selector = f"bench-set={prefix}"
                for generation in (1, 2):  # the first write creates; the second is the rotation measured
                    started = time.perf_counter()
                    written = put_pull_secrets.fn(kube, [], selector, "registry-pull", SecretStr(docker_config(generation)),
                                                  args.service_account, "bench", "bench")
                    seconds = time.perf_counter() - started
                    peer = kubectl_apply(kubeconfig, prefix, count, generation, work)
                assert len(written) == count and set(written.values()) == {"updated"}, set(written.values())
                print(f"{count:>10} {seconds:>9.2f} {seconds / count * 1000:>7.1f} {peer:>10.2f} "
                      f"{peer / count * 1000:>7.1f} {seconds / peer:>6.2f}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
