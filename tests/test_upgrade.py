"""`crflow upgrade` on the local target: the diff artifact, the dry run, a restart only when the
pod changes, storage that survives, and the automatic rollback of an upgrade that breaks."""

from __future__ import annotations

import json

from test_rotate import push

from conftest import last_artifact
from crflow.oci import Registry
from servers import free_port


def set_chart_values(site, values: dict) -> None:
    site.settings["chart"] = {"values": values}
    site.write()


def test_dry_run_diff_then_upgrade_keeps_data_and_a_no_change_upgrade_restarts_nothing(crflow, installed, prefect_api):
    digest, pid = push(installed), installed.pod.pid()
    manifests = installed.pod.manifestfile.read_text()
    set_chart_values(installed, {"configData": {"log": {"level": "debug"}}, "garbageCollect": {"enabled": True}})

    out = crflow("upgrade", "-c", str(installed.path), "--dry-run").stdout
    assert "3 objects would change" in out
    diff = last_artifact(prefect_api, "crflow-upgrade-diff")
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert "level: debug" in added  # config.yml shown line by line
    assert "+++ upgrade/CronJob/registry-garbage-collect" in diff  # turning garbage collection on
    assert sorted(line for line in diff.splitlines() if line.startswith("+++ ")) == [
        "+++ upgrade/ConfigMap/registry-config", "+++ upgrade/CronJob/registry-garbage-collect",
        "+++ upgrade/Deployment/registry"]  # the Deployment: its checksum/config annotation
    assert installed.login()[1] not in diff
    assert installed.pod.pid() == pid and installed.pod.manifestfile.read_text() == manifests  # nothing changed

    assert "verify passed" in crflow("upgrade", "-c", str(installed.path)).stdout
    assert installed.pod.pid() != pid  # the pod spec changed: restarted
    with Registry.from_bundle(installed.url, installed.client) as registry:
        assert registry.pull_image("team/app", digest)  # storage survived, same digest

    pid = installed.pod.pid()
    out = crflow("upgrade", "-c", str(installed.path)).stdout
    assert "no change" in out and installed.pod.pid() == pid
    assert "No change" in last_artifact(prefect_api, "crflow-upgrade-diff")


def test_an_upgrade_that_breaks_the_registry_is_rolled_back(crflow, installed, prefect_api):
    digest = push(installed)
    manifests = installed.pod.manifestfile.read_text()
    set_chart_values(installed, {"configData": {"http": {"prefix": "/broken/"}}})  # /v2/ moves away

    result = crflow("upgrade", "-c", str(installed.path), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "crflow: error: the upgrade failed and was rolled back to the previous pod spec, which passes verify")
    assert installed.pod.manifestfile.read_text() == manifests
    assert "rolled back" in last_artifact(prefect_api, "crflow-upgrade")
    with Registry.from_bundle(installed.url, installed.client) as registry:
        assert registry.pull_image("team/app", digest)


def test_a_new_port_moves_the_registry_and_the_client_files_follow(crflow, installed):
    digest, old_server = push(installed), installed.server
    installed.port = free_port()
    installed.settings["registry"]["port"] = installed.port
    installed.write()
    assert "verify passed" in crflow("upgrade", "-c", str(installed.path)).stdout
    auths = json.loads((installed.client / "auth.json").read_text())["auths"]
    assert list(auths) == [installed.server, f"localhost:{installed.port}"] and installed.server != old_server
    with Registry.from_bundle(installed.url, installed.client) as registry:
        assert registry.pull_image("team/app", digest)
