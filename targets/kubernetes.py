"""The kubernetes target: the chart installed with helm, the registry's Secrets in the
cluster, pull Secrets in every consumer namespace, and a test pod that pulls with one.

Task modules are imported in the methods that run them, as in targets/local.py, so that
`crflow status` stays free of Prefect.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from crflow.chart import (
    SECRETS,
    SecretData,
    data_claim,
    mirror_login_secret,
    mirror_name,
    node_trust_name,
    rendered_deployment,
    secret_name,
    secret_type,
)
from crflow.errors import CrflowError, NotInstalled
from crflow.health import Health, Status, mirror_health, registry_health
from crflow.settings import Site
from crflow.state import secret_name as state_secret_name
from crflow.targets import Check, HoldsState, Release, Target


class KubernetesTarget(Target, HoldsState):
    def __init__(self, site: Site):
        super().__init__(site)
        from crflow.tasks.kubeapi import KubeAccess

        cluster = site.cluster
        self.kube = KubeAccess(kubeconfig=cluster.kubeconfig and str(cluster.kubeconfig), context=cluster.context,
                               read_seconds=cluster.api_timeout_seconds)
        self._from_cluster: Path | None = None  # the client files client_bundle() wrote from the cluster
        self._version: str | None = None

    def kube_version(self) -> str | None:
        from crflow.tasks.kubeapi import server_version

        if self._version is None:
            self._version = server_version(self.kube)
        return self._version

    def check_host(self) -> None:
        from crflow.tasks.helm import helm_executable

        helm_executable()

    def held_ca(self) -> str | None:
        from crflow.tasks.secrets import read_held_ca

        site = self.site
        # The CA Secret; a release installed before it existed has the CA in its TLS Secret.
        return read_held_ca(self.kube, site.namespace, [secret_name(site.release, "ca"), secret_name(site.release, "tls")])

    def fetch_state(self) -> None:
        from crflow.state import merge
        from crflow.tasks.secrets import read_state

        site, name = self.site, state_secret_name(self.site.release)
        held = read_state(self.kube, site.namespace, name)
        if held is not None:
            merge(site.state_dir, held, f"Secret {site.namespace}/{name}")

    def keep_state(self) -> None:
        from crflow.tasks.secrets import keep_state

        site = self.site
        keep_state(self.kube, site.namespace, state_secret_name(site.release), site.state_dir, site.release)

    def prepare(self) -> None:
        from crflow.tasks.kubeapi import create_namespace
        from crflow.tasks.volumes import create_hostpath_volume

        site = self.site
        create_namespace(self.kube, site.namespace, site.release)
        volume = self.store.node_volume
        if volume is not None:
            create_hostpath_volume(self.kube, site.namespace, data_claim(site.release), volume.path, volume.node,
                                   volume.size, site.release)

    def s3_keys(self):
        from crflow.tasks.secrets import read_s3_keys_secret

        source = self.site.storage.credentials
        return read_s3_keys_secret(self.kube, source.namespace, source.name, source.access_key_key,
                                   source.secret_key_key)

    def _put_secrets(self, contents: SecretData) -> None:
        from crflow.tasks.secrets import put_secret

        site = self.site
        roles = {secret_name(site.release, role): role for role in SECRETS}
        for name, data in contents.items():  # the registry's, by role; the rest (mirrors' CAs and upstream logins) Opaque
            role = roles.get(name)
            if role is not None:
                self.update_secret(role, data)
            else:
                put_secret(self.kube, site.namespace, name, "Opaque", data, site.release)

    def update_secret(self, role: str, data: dict[str, SecretStr]) -> None:
        from crflow.tasks.secrets import put_secret

        site = self.site
        put_secret(self.kube, site.namespace, secret_name(site.release, role), secret_type(role), data, site.release)

    def deploy(self, values: dict, manifests: list[dict], secrets: SecretData, changed: bool = False) -> Release:
        from crflow.tasks.helm import helm_release
        from crflow.tasks.secrets import prune_mirror_secrets

        site = self.site
        self._put_secrets(secrets)  # (unchanged ones are left as they are: the API server keeps their version)
        values = self._with_login_versions(values)
        revision = helm_release(self.kube, site.release, site.namespace, values, site.cluster.helm_timeout_seconds,
                                always=changed)
        # Those of a mirror the site file no longer names (its Deployment went with the chart's values).
        prune_mirror_secrets(self.kube, site.namespace, site.release, list(secrets))
        self._wait_for_rollouts(manifests)
        self._wait_for_load_balancer(manifests)
        self._wait_for_node_trust()
        return Release(revision, manifests)

    def _with_login_versions(self, values: dict) -> dict:
        """`values` with each mirror's `loginVersion`: the version of the upstream-login Secret
        crflow wrote for it. A proxy reads its login once, at start: a new version rolls its pod."""
        from crflow.tasks.secrets import secret_versions

        site = self.site
        ours = {m.name: mirror_login_secret(site.release, m.name) for m in site.mirrors
                if m.login is not None and m.login.secret is None}
        if not ours:
            return values
        versions = secret_versions(self.kube, site.namespace, list(ours.values()))
        mirrors = [{**entry, "loginVersion": versions[ours[entry["name"]]]} if ours.get(entry["name"]) in versions
                   else entry for entry in values.get("mirrors", [])]
        return {**values, "mirrors": mirrors}

    def _wait_for_rollouts(self, manifests: list[dict]) -> None:
        """What follows (verify, a read-only check, the served certificate) must meet the new
        pods only: wait until no pod of an older spec is left."""
        from crflow.tasks.workloads import wait_for_rollouts

        site = self.site
        names = sorted(m["metadata"]["name"] for m in manifests if m.get("kind") == "Deployment")
        if names:
            wait_for_rollouts(self.kube, site.namespace, names, site.cluster.helm_timeout_seconds)

    def _wait_for_load_balancer(self, manifests: list[dict]) -> None:
        """A LoadBalancer Service is no use to clients until a controller gives it its address."""
        from crflow.tasks.workloads import LOAD_BALANCER_SECONDS, wait_for_load_balancer

        site = self.site
        for service in manifests:
            if service.get("kind") == "Service" and (service.get("spec") or {}).get("type") == "LoadBalancer":
                wait_for_load_balancer(self.kube, site.namespace, service["metadata"]["name"],
                                       site.registry.ips[0] if site.registry.ips else None,
                                       min(LOAD_BALANCER_SECONDS, site.cluster.helm_timeout_seconds))

    def _wait_for_node_trust(self) -> int:
        """Nodes pull only once the DaemonSet has written the CA on each: wait for every node;
        returns how many there are (0 with node trust off)."""
        from crflow.tasks.workloads import wait_for_node_trust

        site = self.site
        if not site.node_trust.enabled:
            return 0
        return wait_for_node_trust(self.kube, site.namespace, node_trust_name(site.release),
                                   site.cluster.helm_timeout_seconds)

    def deployed(self) -> Release:
        from crflow.tasks.helm import deployed_release

        return Release(*deployed_release(self.kube, self.site.release, self.site.namespace))

    def roll_back(self, to: Release, secrets: SecretData) -> Release:
        from crflow.tasks.helm import rollback_release

        site = self.site
        self._put_secrets(secrets)
        revision = rollback_release(self.kube, site.release, site.namespace, to.revision,
                                    site.cluster.helm_timeout_seconds)
        self._wait_for_rollouts(to.manifests)
        self._wait_for_node_trust()
        return Release(revision, to.manifests)

    def running_pod(self) -> dict:
        from crflow.tasks.workloads import read_registry_pod

        return read_registry_pod(self.kube, self.site.namespace, self.site.release)

    def checks(self, pushed) -> list[Check]:
        from crflow.tasks.workloads import pull_with_secret

        image = f"{self.site.registry.server}/{pushed.repo}@{pushed.digest}"
        return [Check("a pod on every node pulls it with a pull secret", pull_with_secret,
                      (self.kube, image, self.client_bundle() / "auth.json", self.site.namespace, self.site.release))]

    def publish_login(self, ca_pem: str, creds) -> list[str]:
        from crflow.tasks.client import save_client_bundle
        from crflow.tasks.consumers import put_pull_secrets

        site, pulls = self.site, self.site.pull_secrets
        save_client_bundle(self.bundle, site.client_servers, ca_pem, creds)
        self.update_secret("login", {"username": SecretStr(creds.user), "password": creds.password})
        return sorted(put_pull_secrets(self.kube, pulls.namespaces, pulls.namespace_selector, pulls.name,
                                       SecretStr(creds.auth_json(site.registry.servers)),
                                       pulls.default_service_account, site.release, site.namespace))

    def client_bundle(self) -> Path:
        """The local client files, or, on a machine that has none (a fresh worker, a laptop
        with kubectl access), ca.crt and auth.json written from the cluster's CA and login
        Secrets into a private temporary directory removed when crflow exits."""
        if (self.bundle / "auth.json").exists():
            return self.bundle
        if self._from_cluster is not None:  # read once per run (verify asks again for its pull check)
            return self._from_cluster
        import atexit
        import shutil
        import tempfile

        from crflow.tasks.client import write_client_bundle
        from crflow.tasks.credentials import Credentials
        from crflow.tasks.kubeapi import api_client
        from crflow.tasks.secrets import read_secret

        site = self.site
        ca_name, login_name = secret_name(site.release, "ca"), secret_name(site.release, "login")
        with api_client(self.kube) as api:
            ca = read_secret(api, site.namespace, ca_name, ["ca.crt"], missing_ok=True)
            login = read_secret(api, site.namespace, login_name, ["username", "password"], missing_ok=True)
        if ca is None or login is None:
            raise NotInstalled(f"no client files in {self.bundle} and no Secrets {ca_name}, {login_name} in "
                               f"{site.namespace}: run crflow install")
        out = Path(tempfile.mkdtemp(prefix="crflow-client-"))  # 0700, this user's
        atexit.register(shutil.rmtree, out, True)
        creds = Credentials(user=login["username"].get_secret_value(), password=login["password"], id="from-cluster")
        self._from_cluster = write_client_bundle(out, site.client_servers, ca["ca.crt"].get_secret_value(), creds)
        return self._from_cluster

    def status(self) -> Health:
        try:
            bundle = self.client_bundle()
        except NotInstalled as err:
            return Health(Status.NOT_INSTALLED, str(err))
        except CrflowError as err:  # nothing here, and the cluster cannot say either
            return Health(Status.NOT_INSTALLED, f"no client files in {self.bundle}, and the cluster could not be "
                                                f"asked for them ({err}); run crflow install, or fix the kubeconfig")
        health = registry_health(self.url, bundle)
        if not health.healthy:
            return health
        mirrors = []
        for mirror in self.site.mirrors:  # (their upstreams as this machine reaches them, not as the pods do)
            server = self.site.mirror_server(mirror)
            mirrored = mirror_health(mirror, server, bundle)
            if not mirrored.healthy:
                return mirrored
            mirrors.append(f"{mirror.name} of {mirror.upstream.rstrip('/')} ({server})")
        return Health(health.status, health.detail + (f"; mirrors: {', '.join(mirrors)}" if mirrors else ""))

    def collect(self, manifests: list[dict], secrets: SecretData, dry_run: bool, delete_untagged: bool,
                mirror: str | None = None):
        """(The Job mounts the Secrets the run's deploy put in the namespace.)"""
        from crflow.tasks.gc import parse_collection
        from crflow.tasks.workloads import run_gc_job

        site = self.site
        deployment = None if mirror is None else mirror_name(site.release, mirror)
        template = rendered_deployment(manifests, deployment)["spec"]["template"]
        instance = deployment or site.release
        flags = [*(["--dry-run"] if dry_run else []), *(["--delete-untagged=true"] if delete_untagged else [])]
        output = run_gc_job(self.kube, site.namespace, f"{instance}-gc", template, flags, instance,
                            site.release, site.gc.timeout_seconds)
        return parse_collection(output)

    def removal_plan(self, purge: bool) -> list[str]:
        site = self.site
        plan = [f"helm release {site.namespace}/{site.release}",
                f"every pull Secret crflow made for {site.release} (and its listing in default ServiceAccounts), "
                "verify's included"]
        if site.node_trust.enabled:
            plan.insert(0, f"the node-trust files on every node ({', '.join(site.registry.servers)})")
        if site.mirrors:
            plan.append(f"the mirrors' Secrets in {site.namespace} (upstream CAs and logins: a later install makes "
                        "them again from the site file)")
        if purge:
            plan.append(f"the registry's Secrets in {site.namespace} (CA, certificate, htpasswd, login) and crflow's "
                        "record of them (a later install makes a new CA)")
            if self.store.node_volume is not None:
                plan.append(f"the claim {data_claim(site.release)} and its PersistentVolume (the node's directory stays)")
        return plan

    def uninstall(self, purge: bool) -> list[str]:
        from crflow.tasks.consumers import remove_pull_secrets
        from crflow.tasks.helm import remove_node_trust, uninstall_release
        from crflow.tasks.secrets import delete_secrets, prune_mirror_secrets
        from crflow.tasks.volumes import delete_hostpath_volume
        from crflow.tasks.workloads import PULL_TEST_NAMESPACE, pull_test_name

        site, timeout, removed = self.site, self.site.cluster.helm_timeout_seconds, []
        if site.node_trust.enabled and remove_node_trust(self.kube, site.release, site.namespace, timeout):
            nodes = self._wait_for_node_trust()
            removed.append(f"the node-trust files on {nodes} nodes")
        if uninstall_release(self.kube, site.release, site.namespace, timeout):
            removed.append(f"helm release {site.namespace}/{site.release}")
        removed += [f"pull Secret {name}" for name in remove_pull_secrets(self.kube, site.release, site.namespace,
                                                                           site.pull_secrets.name)]
        # verify's own pull Secret holds the login too: left behind, it would be valid again after a reinstall
        removed += delete_secrets(self.kube, PULL_TEST_NAMESPACE, [pull_test_name(site.namespace, site.release)],
                                  site.release, site.namespace)
        # A mirror's Secrets are copies of what the site file names: left behind, an upstream login outlives its use.
        removed += prune_mirror_secrets(self.kube, site.namespace, site.release, [])
        if purge:
            held = [secret_name(site.release, r) for r in SECRETS] + [state_secret_name(site.release)]
            removed += delete_secrets(self.kube, site.namespace, held, site.release, site.namespace)
            if self.store.node_volume is not None:
                removed += delete_hostpath_volume(self.kube, site.namespace, data_claim(site.release))
        return removed

