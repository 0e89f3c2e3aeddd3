"""`crflow deploy` and alerts, on a real Prefect server with a real process worker and a real
HTTP webhook receiver in the test: each site's deployments run against that site, a failed
nightly check reaches a person, and so do a rolled-back rotation and a certificate near its
end. The notification payloads are searched for every secret."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler

import httpx
from test_secrets import secrets_of

from crflow.flows.deployments import deployment_plan
from crflow.flows.site_lock import site_name
from crflow.health import registry_health
from crflow.settings import Schedules, load_site
from servers import BIN, http_server, start_server, stop_server

TOKEN = "hook-token-0123456789abcdef"  # stands for the secret in a Slack or Teams webhook URL


class Receiver:
    """What the webhook got: one JSON body per POST."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.paths.append(self.path)
                receiver.bodies.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.handler = Handler

    def wait_for(self, *words: str, timeout: float = 60) -> dict:
        """The first body whose text holds every one of `words`, polled for up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in list(self.bodies):
                text = json.dumps(body)
                if all(word in text for word in words):
                    return body
            time.sleep(0.3)
        raise AssertionError(f"no notification with {words} within {timeout} s; got {self.bodies}")


def run_deployment(api: str, flow: str, site) -> str:
    name = site_name(load_site(site.path))
    deployment = httpx.get(f"{api}/deployments/name/{flow}/{name}").raise_for_status().json()
    return httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}).raise_for_status().json()["id"]


def wait_final(api: str, flow_run_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} did not end within {timeout} s")


def site_deployments(api: str, site) -> list[str]:
    tag = f"crflow-site:{site_name(load_site(site.path))}"
    found = httpx.post(f"{api}/deployments/filter", json={"deployments": {"tags": {"all_": [tag]}}}).json()
    return sorted(d["entrypoint"] for d in found)


def test_two_sites_deployed_each_runs_against_its_own_and_a_failed_check_reaches_the_webhook(
        crflow, make_site, prefect_api, tmp_path):
    receiver = Receiver()
    pool = f"crflow-alerts-{tmp_path.name[-12:].lower().replace('_', '-')}"  # this test's worker runs only these
    with http_server(receiver.handler) as hook:
        a, b = make_site(), make_site()
        for site in (a, b):
            site.settings["alerts"] = {"webhook": f"{hook}/notify?token={TOKEN}"}
            site.settings["schedules"] = {"verify": "0 2 * * *"}
            site.write()
            out = crflow("deploy", "-c", str(site.path), "--pool", pool).stdout
            assert "verify-push-pull/registry@" in out and "(0 2 * * * UTC)" in out and "3 automations" in out
        crflow("deploy", "-c", str(a.path), "--pool", pool)  # a rerun updates, never duplicates
        assert len(site_deployments(prefect_api, a)) == len(deployment_plan(Schedules()))

        env = {**crflow.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_HOME": str(tmp_path / "worker-home")}
        worker = start_server([str(BIN / "prefect"), "worker", "start", "--pool", pool], tmp_path / "worker.log", env)
        try:
            installs = [run_deployment(prefect_api, "install", site) for site in (a, b)]
            assert [wait_final(prefect_api, run) for run in installs] == ["COMPLETED", "COMPLETED"], \
                (tmp_path / "worker.log").read_text()[-3000:]
            for site in (a, b):  # each deployment installed its own site: its own registry and client files
                assert registry_health(site.url, site.client).healthy
            secrets = secrets_of(a)

            crflow("down", "-c", str(a.path))
            failed = run_deployment(prefect_api, "verify-push-pull", a)
            assert wait_final(prefect_api, failed) == "FAILED"
            name_a, name_b = (site_name(load_site(s.path)) for s in (a, b))
            alert = receiver.wait_for(name_a, "verify-push-pull", "push a new image", "not answering")
            ui = prefect_api.removesuffix("/api")
            assert f"({ui}/runs/flow-run/{failed})" in alert["text"]  # a link to the run
            assert not any(name_b in json.dumps(body) for body in receiver.bodies)
        finally:
            stop_server(worker)

        # A certificate near its end (alerts.cert_days above the 365 days left), from a CLI run.
        b.settings["alerts"]["cert_days"] = 400
        b.write()
        crflow("verify", "-c", str(b.path))
        receiver.wait_for(name_b, "a certificate ends soon", "days left")

        # A rotation that rolled back: the registry made read-only, so the new login's push fails.
        b.settings["chart"] = {"values": {"configData": {"storage": {"maintenance": {"readonly": {"enabled": True}}}}}}
        b.write()
        crflow("install", "-c", str(b.path), check=False)
        assert crflow("rotate-credentials", "-c", str(b.path), "--grace", "0", check=False).returncode == 1
        receiver.wait_for(name_b, "rotation was rolled back", "405")
        receiver.wait_for(name_b, "rotate-credentials Failed")  # CLI runs carry the site's tag too

    # Nothing secret in any notification: not the site's secrets, not the webhook's token.
    payloads = json.dumps(receiver.bodies)
    for what, value in {**secrets, "webhook token": TOKEN}.items():
        assert value not in payloads, f"the {what} is in a notification"
    assert all(TOKEN in path for path in receiver.paths)  # the token did its job: it is in the URL called

    removed = crflow("deploy", "-c", str(a.path), "--remove").stdout
    assert removed.startswith("Removed 6 deployments and 3 automations")
    assert site_deployments(prefect_api, a) == [] and len(site_deployments(prefect_api, b)) == 6
