"""prefect.yaml works as documented: deploy it (the schedules are there), and a real Prefect
worker (process work pool) runs the `install` deployment, which installs a working registry."""

from __future__ import annotations

import os
import subprocess
import time

import httpx

from conftest import ROOT
from crflow.health import registry_health
from crflow.tasks.helm import helm_executable
from servers import BIN, start_server, stop_server


def prefect(*args: str, env: dict) -> str:
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_worker_runs_the_install_deployment(prefect_api, make_site, tmp_path):
    site = make_site()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRFLOW_"))}
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "prefect-client"), DO_NOT_TRACK="1",
               CRFLOW_HELM=helm_executable())
    pool = "crflow"
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env=env,
                   capture_output=True, timeout=60)  # an existing pool is fine
    assert "install" in prefect("deploy", "--all", env=env)
    for name, cron in (("verify-push-pull/verify-nightly", "17 3 * * *"),
                       ("rotate-credentials/rotate-credentials-monthly", "0 4 1 * *"),
                       ("gc/gc-weekly", "30 4 * * 0")):
        deployment = httpx.get(f"{prefect_api}/deployments/name/{name}").json()
        schedules = httpx.get(f"{prefect_api}/deployments/{deployment['id']}/schedules").json()
        assert [s["schedule"]["cron"] for s in schedules] == [cron]
    # A run pointed at a site file nobody registered is refused; `crflow deploy` registers one.
    stranger = make_site()
    refused = prefect("deployment", "run", "install/install", "--param", f"site_file={stranger.path}", env=env)
    refused_id = refused.split("UUID:")[1].split()[0]
    env["CRFLOW_HOME"] = str(tmp_path / "crflow-home")
    deployed = subprocess.run([str(BIN / "crflow"), "deploy", "-c", str(site.path), "--pool", pool], env=env,
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert deployed.returncode == 0, deployed.stderr
    run = prefect("deployment", "run", "install/install", "--param", f"site_file={site.path}", env=env)
    flow_run_id = run.split("UUID:")[1].split()[0]

    worker = start_server([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
                          tmp_path / "worker.log", env)
    try:
        # Both runs to their end before the worker stops: the refused one's process may start
        # after the install's has finished, on a busy machine (it was still PENDING once in CI).
        deadline, final = time.monotonic() + 240, ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        while time.monotonic() < deadline:
            state = httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}").json()["state"]["type"]
            refused_state = httpx.get(f"{prefect_api}/flow_runs/{refused_id}").json()["state"]["type"]
            if state in final and refused_state in final:
                break
            time.sleep(1)
    finally:
        stop_server(worker)
    assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    assert registry_health(site.url, site.client).healthy
    refused_run = httpx.get(f"{prefect_api}/flow_runs/{refused_id}").json()
    assert refused_run["state"]["type"] == "FAILED" and "is not the one its deployment was bound to" in \
        refused_run["state"]["message"]
    assert not stranger.state.exists()


def test_prefect_yaml_holds_the_deployments_crflow_deploy_makes():
    """The two ways to deploy cannot drift: each prefect.yaml deployment runs a flow of
    `crflow deploy`'s plan by its module path (a worker needs crflow installed, not this
    checkout), with the same extra parameters and the default schedule."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from crflow.flows.deployments import deployment_plan
    from crflow.settings import Schedules

    shipped = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    plan = {flow.name: (extra, [s.cron for s in schedules]) for flow, extra, schedules, _ in deployment_plan(Schedules())}
    assert sorted(load_flow_from_entrypoint(d["entrypoint"]).name for d in shipped) == sorted(plan)
    for deployment in shipped:
        assert deployment["entrypoint"].startswith("crflow.flows.") and ":" not in deployment["entrypoint"]
        extra, crons = plan[load_flow_from_entrypoint(deployment["entrypoint"]).name]
        assert {k: v for k, v in deployment["parameters"].items() if k != "site_file"} == extra, deployment["name"]
        assert [s["cron"] for s in deployment.get("schedules", [])] == crons, deployment["name"]
