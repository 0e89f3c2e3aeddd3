"""From the site file to the plain values tasks take: chart values and cluster access."""

from __future__ import annotations

from crflow.settings import PvcStorage, S3Storage, Site
from tasks.helm import chart_values, merged
from tasks.kube import KubeAccess


def kube_access(site: Site) -> KubeAccess:
    return KubeAccess(kubeconfig=site.cluster.kubeconfig and str(site.cluster.kubeconfig), context=site.cluster.context)


def chart_values_for(site: Site, cert_fingerprint: str) -> dict:
    storage = site.storage
    s3 = {}
    if isinstance(storage, S3Storage):
        s3 = dict(
            s3_endpoint=storage.endpoint,
            s3_bucket=storage.bucket,
            s3_region=storage.region,
            s3_root_directory=storage.root_directory,
            s3_ca_bundle=storage.ca_bundle is not None,
            s3_skip_verify=storage.skip_verify,
        )
    return merged(site.chart.values, chart_values(
        site.release,
        storage="s3" if isinstance(storage, S3Storage) else "filesystem",
        service_type=site.registry.service_type,
        service_port=site.registry.port,
        load_balancer_ip=(site.registry.ips or [None])[0],
        cert_fingerprint=cert_fingerprint,
        claim=storage.existing_claim if isinstance(storage, PvcStorage) else None,
        **s3,
    ))
