"""The kubernetes target: the chart installed with helm, the registry's Secrets in the
cluster, pull Secrets in every consumer namespace, and a test pod that pulls with one.

Task modules are imported in the methods that run them, as in targets/local.py, so that
`crflow status` stays free of Prefect.
"""

from __future__ import annotations

from pydantic import SecretStr

from crflow.chart import SECRETS, SecretData, data_claim, node_trust_name, secret_name, secret_type
from crflow.errors import CrflowError
from crflow.health import Health, registry_health
from crflow.settings import Site
from crflow.targets import Check, Release, Target


class KubernetesTarget(Target):
    def __init__(self, site: Site):
        super().__init__(site)
        from crflow.tasks.kubeapi import KubeAccess

        cluster = site.cluster
        self.kube = KubeAccess(kubeconfig=cluster.kubeconfig and str(cluster.kubeconfig), context=cluster.context)

    def check_host(self) -> None:
        from crflow.tasks.helm import helm_executable

        helm_executable()

    def prepare(self) -> None:
        from crflow.tasks.kubeapi import create_namespace
        from crflow.tasks.volumes import create_hostpath_volume

        site = self.site
        create_namespace(self.kube, site.namespace, site.release)
        volume = getattr(site.storage, "host_path", None)
        if volume is not None:
            create_hostpath_volume(self.kube, site.namespace, data_claim(site.release), volume.path, volume.node,
                                   volume.size, site.release)

    def s3_keys(self):
        from crflow.tasks.secrets import read_s3_keys_secret

        source = self.site.storage.credentials
        return read_s3_keys_secret(self.kube, source.namespace, source.name, source.access_key_key,
                                   source.secret_key_key)

    def put_secrets(self, contents: SecretData) -> None:
        for role in SECRETS:
            name = secret_name(self.site.release, role)
            if name in contents:
                self.update_secret(role, contents[name])

    def update_secret(self, role: str, data: dict[str, SecretStr]) -> None:
        from crflow.tasks.secrets import put_secret

        site = self.site
        put_secret(self.kube, site.namespace, secret_name(site.release, role), secret_type(role), data, site.release)

    def deploy(self, values: dict, manifests: list[dict], changed: bool = False) -> Release:
        from crflow.tasks.helm import helm_release

        site = self.site
        revision = helm_release(self.kube, site.release, site.namespace, values, site.cluster.helm_timeout_seconds,
                                always=changed)
        self._wait_for_node_trust()
        return Release(revision, manifests)

    def _wait_for_node_trust(self) -> None:
        """Nodes pull only once the DaemonSet has written the CA on each: wait for every node."""
        from crflow.tasks.workloads import wait_for_node_trust

        site = self.site
        if site.node_trust.enabled:
            wait_for_node_trust(self.kube, site.namespace, node_trust_name(site.release),
                                site.cluster.helm_timeout_seconds)

    def deployed(self) -> Release:
        from crflow.tasks.helm import deployed_release

        return Release(*deployed_release(self.kube, self.site.release, self.site.namespace))

    def roll_back(self, to: Release) -> Release:
        from crflow.tasks.helm import rollback_release

        site = self.site
        revision = rollback_release(self.kube, site.release, site.namespace, to.revision,
                                    site.cluster.helm_timeout_seconds)
        self._wait_for_node_trust()
        return Release(revision, to.manifests)

    def running_pod(self) -> dict:
        from crflow.tasks.workloads import read_registry_pod

        return read_registry_pod(self.kube, self.site.namespace, self.site.release)

    def checks(self, pushed) -> list[Check]:
        from crflow.tasks.workloads import pull_with_secret

        image = f"{self.site.registry.server}/{pushed.repo}@{pushed.digest}"
        return [("a pod on every node pulls it with a pull secret", pull_with_secret,
                 (self.kube, image, self.bundle / "auth.json", self.site.release))]

    def publish_login(self, ca_pem: str, creds) -> list[str]:
        from crflow.tasks.client import save_client_bundle
        from crflow.tasks.consumers import put_pull_secrets

        site, pulls = self.site, self.site.pull_secrets
        save_client_bundle(self.bundle, site.registry.servers, ca_pem, creds)
        self.update_secret("login", {"username": SecretStr(creds.user), "password": creds.password})
        return sorted(put_pull_secrets(self.kube, pulls.namespaces, pulls.namespace_selector, pulls.name,
                                       SecretStr(creds.auth_json(site.registry.servers)),
                                       pulls.default_service_account, site.release))

    def status(self) -> Health:
        return registry_health(self.url, self.bundle)

    def down(self) -> bool:
        raise CrflowError("crflow down stops the local target's registry; on Kubernetes use helm uninstall")
