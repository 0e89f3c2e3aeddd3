"""Rotation on the emulated cluster. EMULATED: the Kubernetes API (tests/kubeapi) and the
kubelet (tests/kubelet.py: Secret volumes refreshed after a delay, rolling updates, the
Service forwarded to the pod); the registry processes, S3 (moto) and the clients are real."""

from __future__ import annotations

import base64
import json
import time

import pytest
import yaml
from cryptography import x509
from kubernetes import client
from test_rotate import PullLoop, push, status

from crflow.tasks.pki import fingerprint as fingerprint_of

pytestmark = pytest.mark.kubernetes

REGISTRY_NS, PULL = "container-registry", "registry-pull"


@pytest.fixture
def consumers(cluster_site, kubelet):
    """Consumer namespaces: team-a listed by name, team-b by label, team-c not selected."""
    core = cluster_site.core
    for name, labels in (("team-a", {}), ("team-b", {"registry-access": "true"}), ("team-c", {})):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    cluster_site.settings["pull_secrets"] = {"name": PULL, "namespaces": ["team-a"],
                                             "namespace_selector": "registry-access=true",
                                             "default_service_account": True}
    cluster_site.settings["rotation"] = {"grace_seconds": 2, "propagation_timeout_seconds": 30}
    cluster_site.write()
    kubelet.delay = 1.0  # Secret volumes change a second after the Secret (a real kubelet: up to ~a minute)
    return cluster_site


def pull_login(core, namespace: str, server: str) -> tuple[str, str]:
    secret = core.read_namespaced_secret(PULL, namespace)
    assert secret.type == "kubernetes.io/dockerconfigjson"
    auth = json.loads(base64.b64decode(secret.data[".dockerconfigjson"]))["auths"][server]["auth"]
    user, _, password = base64.b64decode(auth).decode().partition(":")
    return user, password


def cluster_state(core) -> dict:
    """Every Secret crflow may touch, and the default ServiceAccounts' pull secrets."""
    state = {}
    for namespace in (REGISTRY_NS, "team-a", "team-b", "team-c"):
        for secret in core.list_namespaced_secret(namespace).items:
            if secret.metadata.name != "registry-crflow-state":  # crflow's own record of the attempt
                state[f"{namespace}/{secret.metadata.name}"] = (secret.type, secret.data)
        accounts = core.list_namespaced_service_account(namespace).items
        state[f"{namespace}/sa"] = [[r.name for r in a.image_pull_secrets or []] for a in accounts]
    return state


def test_rotation_fails_no_pull_and_reaches_every_consumer_namespace(crflow, consumers, kubelet):
    site, core = consumers, consumers.core
    crflow("install", "-c", str(site.path))
    old = site.login()
    assert pull_login(core, "team-a", site.server) == old == pull_login(core, "team-b", site.server)
    assert PULL not in [s.metadata.name for s in core.list_namespaced_secret("team-c").items]
    digest = push(site)
    serial = kubelet.serial

    # A workload in team-b: it reads its pull Secret before every pull, through the Service.
    loop = PullLoop(site.url, site.client / "ca.crt", lambda: pull_login(core, "team-b", site.server),
                    "team/app", digest)
    time.sleep(0.5)
    crflow("rotate-credentials", "-c", str(site.path))
    time.sleep(0.5)
    loop.stop()

    new = site.login()
    assert loop.failures == [] and loop.ok > 20, loop.failures[:5]
    assert loop.users == [old[0], new[0]]
    assert kubelet.serial == serial  # no pod was replaced: the registry re-read htpasswd
    for namespace in ("team-a", "team-b"):
        assert pull_login(core, namespace, site.server) == new
        assert [r.name for r in core.read_namespaced_service_account("default", namespace).image_pull_secrets] == [PULL]
    assert status(site, *new) == 200 and status(site, *old) == 401
    login = core.read_namespaced_secret("registry-login", REGISTRY_NS)
    assert base64.b64decode(login.data["username"]).decode() == new[0]

    # A namespace that starts pulling later gets the pull Secret on the next run.
    core.patch_namespace("team-c", {"metadata": {"labels": {"registry-access": "true"}}})
    crflow("rotate-credentials", "-c", str(site.path), "--grace", "0")
    newest = site.login()
    assert {pull_login(core, ns, site.server) for ns in ("team-a", "team-b", "team-c")} == {newest}
    assert status(site, *newest) == 200 and status(site, *new) == 401


def test_certificate_renewal_rolls_the_pod_with_no_failed_pull(crflow, cluster_site, kubelet):
    site = cluster_site
    crflow("install", "-c", str(site.path))
    digest, serial = push(site), kubelet.serial
    before = (site.client / "ca.crt").read_text()
    loop = PullLoop(site.url, site.client / "ca.crt", site.login, "team/app", digest)  # trusts the CA only
    time.sleep(0.5)
    run = crflow("rotate-cert", "-c", str(site.path))
    time.sleep(0.5)
    loop.stop()

    assert loop.failures == [] and loop.ok > 20, loop.failures[:5]
    assert kubelet.serial == serial + 1  # a new pod, the Service switched to it when it was ready
    assert (site.client / "ca.crt").read_text() == before  # clients and nodes need no change
    fingerprint = run.stdout.strip().rsplit(" ", 1)[-1]
    tls = site.core.read_namespaced_secret("registry-tls", REGISTRY_NS)
    assert fingerprint_of(x509.load_pem_x509_certificate(base64.b64decode(tls.data["tls.crt"]))) == fingerprint


def make_read_only(site, kubelet) -> None:
    """A fault at step 3: the registry refuses pushes (distribution's read-only maintenance
    mode), set the way an operator would: the ConfigMap, and a template change that rolls it."""
    apps, core = client.AppsV1Api(site.core.api_client), site.core
    deployment = apps.read_namespaced_deployment("registry", REGISTRY_NS)
    (name,) = [v.config_map.name for v in deployment.spec.template.spec.volumes if v.config_map]
    config_map = core.read_namespaced_config_map(name, REGISTRY_NS)
    config = yaml.safe_load(config_map.data["config.yml"])
    config["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    core.patch_namespaced_config_map(name, REGISTRY_NS, {"data": {"config.yml": yaml.safe_dump(config)}})
    serial = kubelet.serial
    apps.patch_namespaced_deployment("registry", REGISTRY_NS, {"spec": {"template": {"metadata": {
        "annotations": {"test/read-only": "true"}}}}})
    deadline = time.monotonic() + 30
    while kubelet.serial == serial:
        assert time.monotonic() < deadline, kubelet.errors
        time.sleep(0.2)


EXPECTED_ERROR = {"3": "was refused (405)", "4": f"write Secret team-b/{PULL} failed with 500",
                  "6": "the registry still accepts user"}


@pytest.mark.parametrize("step", ["3-push-refused", "4-api-errors", "6-old-login-not-retired"])
def test_a_failed_rotation_rolls_back_and_the_old_login_keeps_working(crflow, consumers, kubelet, kube_api, step):
    site, core = consumers, consumers.core
    crflow("install", "-c", str(site.path))
    old, before = site.login(), cluster_state(core)
    pending = site.state / "rotation" / "new" / "auth.json"

    if step.startswith("3"):
        make_read_only(site, kubelet)
        process = crflow.popen("rotate-credentials", "-c", str(site.path))
    elif step.startswith("4"):  # beyond the retries: every write of team-b's pull Secret fails
        kube_api.fault(path=f"/namespaces/team-b/secrets/{PULL}$", method="PUT", status=500, count=10_000)
        process = crflow.popen("rotate-credentials", "-c", str(site.path))
    else:  # the new htpasswd never reaches the pod: the old login is not refused in time
        site.settings["rotation"]["propagation_timeout_seconds"] = 6
        site.write()
        process = crflow.popen("rotate-credentials", "-c", str(site.path), "--grace", "3")
        deadline = time.monotonic() + 90
        while pull_login(core, "team-a", site.server) == old:  # step 4 done; step 5 (grace) running
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        kubelet.delay = 3600
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 1, output[-2000:]
    assert EXPECTED_ERROR[step[0]] in output, output[-2000:]
    assert "Rollback hook 'undo' finished running successfully" in output

    attempted = json.loads(pending.read_text())  # the new login the failed run made
    assert cluster_state(core) == before  # htpasswd, login and pull Secrets, ServiceAccounts: as they were
    assert site.login() == old
    assert status(site, *old) == 200  # the old login kept working
    assert json.loads((site.state / "generations.json").read_text())["rotating_to"] == 1

    if step.startswith("3"):
        return
    kube_api.clear_faults()
    kubelet.delay = 1.0
    crflow("rotate-credentials", "-c", str(site.path), "--grace", "0")
    assert json.loads(site.client.joinpath("auth.json").read_text()) == attempted  # no second new user
    assert status(site, *site.login()) == 200 and status(site, *old) == 401
