"""The flow image a Kubernetes work pool's Jobs run (deployments/Dockerfile), built by buildah from
crflow's wheel on a Debian base made here (tests/shipping.py: debootstrap, since no hub is
reachable), then judged by podman, skopeo and containerd, not by crflow. Skipped only where
buildah or podman cannot run here, and the skip says why. REAL: buildah, podman, skopeo,
containerd, Debian's docker-registry, the session's Prefect server."""

from __future__ import annotations

import re
import subprocess

import pytest
from shipping import PODMAN_LIMITS, Unavailable, build_wheel, check_tools, flow_image

# HOME as the job template gives it: an emptyDir the pod's user (fsGroup 10001) may write.
HOME = "/var/lib/crflow:rw,mode=0700,U"  # U: owned by the image's user, 10001


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    try:
        check_tools()
    except Unavailable as why:
        pytest.skip(f"the flow image cannot be built here: {why}")
    return flow_image(build_wheel(tmp_path_factory.mktemp("image")))


def podman_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", "run", "--rm", *PODMAN_LIMITS, *args], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"podman run failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def test_the_image_runs_crflow_as_uid_10001_on_a_read_only_root(image):
    # No network: podman's default bridge would switch the host's ip_forward on, and leave it on.
    locked_down = ["--network", "none", "--read-only", "--tmpfs", HOME, "--cap-drop", "all", "--security-opt",
                   "no-new-privileges"]
    said = podman_run(*locked_down, image).stdout  # its default command: crflow --version
    assert re.fullmatch(r"crflow 0\.1\.0 \(Python 3\.11\.\d+, Prefect 3\.9\.1, helm v4\.3\.1 \(/usr/local/bin/helm\), "
                        r"distribution not found\)\n", said), said
    assert podman_run(*locked_down, image, "id", "-u").stdout == "10001\n"
    refused = podman_run(*locked_down, image, "sh", "-c", "touch /opt/crflow/planted", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr


def test_the_image_runs_a_real_flow_verify_against_a_local_registry_on_the_host_network(image, installed, crflow):
    """As root in the container, since the site's state_dir is root's 0700, with one capability:
    reading the registry's own (uid 1000) blobs; in the host's process namespace too, where
    the local target's registry is a process."""
    site = installed
    where = str(site.path.parent)
    result = podman_run("--read-only", "--tmpfs", "/var/lib/crflow", "--cap-drop", "all", "--cap-add",
                        "DAC_READ_SEARCH", "--user", "0",
                        "--network", "host", "--pid", "host", "--volume", f"{where}:{where}", "--env", f"PREFECT_API_URL={crflow.api}",
                        "--env", "DO_NOT_TRACK=1", image, "crflow", "verify", "-c", str(site.path))
    assert f"https://{site.server}: all checks passed" in result.stdout, result.stderr[-2000:]
    assert f"Flow run 'verify-push-pull registry@{site.server}'" in result.stderr


def test_the_image_goes_into_crflows_registry_and_containerd_pulls_it_back(image, installed, crflow, tmp_path):
    from containerd import Containerd

    from conftest import skopeo

    site = installed
    ref = f"{site.server}/crflow/flow:{image.rsplit(':', 1)[1]}"
    skopeo("copy", "--dest-authfile", str(site.client / "auth.json"), "--dest-cert-dir", str(site.client),
           f"containers-storage:{image}", f"docker://{ref}")
    root = tmp_path / "node"
    root.mkdir()
    crflow("trust", "-c", str(site.path), "--runtime", "containerd", "--root", str(root))
    runtime = Containerd(tmp_path / "containerd", root / "etc" / "containerd" / "certs.d")
    try:
        assert runtime.pull(ref, *site.login()) is None
    finally:
        runtime.stop()
