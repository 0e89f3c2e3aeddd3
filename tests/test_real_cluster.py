"""Opt-in: the same end-to-end check against a real cluster (kind, k3d, MicroK8s...).

    CRFLOW_E2E_KUBECONFIG=~/.kube/config CRFLOW_E2E_SITE=site.yaml .venv/bin/python -m pytest tests/test_real_cluster.py

CRFLOW_E2E_SITE is a site file with `target: kubernetes` for that cluster, whose registry
address (`registry.ips`/`dns_names` and `port`) this machine can reach: on kind or k3d a
NodePort or a port mapping, on MicroK8s the MetalLB address. Its storage can be `pvc` with a
`host_path`, or `s3` with MinIO's secret in the cluster. Skipped unless both are set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import cached_tasks, oci_layout, skopeo
from crflow.settings import load_site

KUBECONFIG, SITE = os.environ.get("CRFLOW_E2E_KUBECONFIG"), os.environ.get("CRFLOW_E2E_SITE")
pytestmark = [pytest.mark.real_cluster,
              pytest.mark.skipif(not (KUBECONFIG and SITE), reason="set CRFLOW_E2E_KUBECONFIG and CRFLOW_E2E_SITE")]


def test_install_then_push_and_pull_on_a_real_cluster(crflow, tmp_path):
    site = load_site(Path(SITE))
    assert site.target == "kubernetes"
    crflow.env["KUBECONFIG"] = str(Path(KUBECONFIG).expanduser())
    crflow("install", "-c", SITE)
    out = tmp_path / "client"
    crflow("export-client", "-c", SITE, "--out", str(out))
    oci_layout(tmp_path / "layout", "v1")
    ref = f"docker://{site.registry.server}/crflow-e2e/hello:v1"
    skopeo("copy", "--dest-authfile", str(out / "auth.json"), "--dest-cert-dir", str(out),
           f"oci:{tmp_path / 'layout'}:v1", ref)
    skopeo("copy", "--src-authfile", str(out / "auth.json"), "--src-cert-dir", str(out), ref, f"oci:{tmp_path / 'pulled'}:v1")
    rerun = crflow("install", "-c", SITE)
    assert rerun.returncode == 0 and len(cached_tasks(crflow.api, Path(SITE))) == 5
