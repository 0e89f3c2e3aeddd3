"""One run per site at a time (Prefect global concurrency limits with a lease), on a real
Prefect server: the overlaps that broke logins before, a killed holder, and two sites that do
not wait on each other. curl judges which logins the registry accepts."""

from __future__ import annotations

import json
import time

import httpx

from conftest import curl_status, task_runs


def wait_for_task(api: str, site, task: str, state: str = "Running", timeout: float = 120) -> None:
    """Poll the Prefect API until the newest run against `site` has `task` in `state`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (task, state) in task_runs(api, site.path):
                return
        except StopIteration:  # no run against this site yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"{task} never reached {state} within {timeout} s")


def htpasswd_users(site) -> list[str]:
    return [line.split(":")[0] for line in (site.state / "pod" / "volumes" / "auth" / "htpasswd").read_text().split()]


def assert_one_login_everywhere(crflow, site, retired: list[tuple[str, str]]) -> None:
    current = site.login()
    assert htpasswd_users(site) == [current[0]]
    assert curl_status(site, *current) == 200
    for login in retired:
        assert curl_status(site, *login) == 401
    assert crflow("status", "-c", str(site.path)).returncode == 0
    crflow("verify", "-c", str(site.path))


def test_two_rotations_started_together_leave_exactly_one_login(crflow, installed):
    first_login = installed.login()
    first = crflow.popen("rotate-credentials", "-c", str(installed.path), "--grace", "2")
    time.sleep(0.3)  # the reported overlap: 0.3 s apart
    second = crflow.popen("rotate-credentials", "-c", str(installed.path), "--grace", "2")
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert json.loads((installed.state / "generations.json").read_text())["credentials"] == 2  # one after the other
    assert_one_login_everywhere(crflow, installed, [first_login])


def test_an_install_during_a_rotations_grace_period_waits_for_it(crflow, installed):
    old = installed.login()
    rotation = crflow.popen("rotate-credentials", "-c", str(installed.path), "--grace", "6")
    wait_for_task(crflow.api, installed, "grace_period")
    install = crflow.popen("install", "-c", str(installed.path))
    assert install.wait(timeout=300) == 0 and rotation.wait(timeout=300) == 0
    assert installed.login() != old
    assert_one_login_everywhere(crflow, installed, [old])


def heartbeats(api: str, flow_run_id: str) -> int:
    """How many `prefect.flow-run.heartbeat` events the server holds for this run (what
    Prefect's zombie automations watch), polled until at least one is there or 60 s pass."""
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                        "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50}
    deadline = time.monotonic() + 60
    while True:
        found = httpx.post(f"{api}/events/filter", json=query, timeout=30).json()["events"]
        if found or time.monotonic() > deadline:
            return len(found)
        time.sleep(0.5)


def test_a_killed_holder_on_this_machine_is_noticed_at_once(crflow, installed):
    rotation = crflow.popen("rotate-credentials", "-c", str(installed.path), "--grace", "600")
    wait_for_task(crflow.api, installed, "grace_period")
    killed_run = json.loads((installed.state / "site.lock").read_text())["flow_run"]
    rotation.kill()  # SIGKILL: no release, no lease renewal any more
    rotation.wait()
    # The CLI turns Prefect's heartbeat thread off; the lease renewer sends the heartbeat, so a
    # zombie automation still sees this killed run's heartbeats stop.
    assert heartbeats(crflow.api, killed_run) >= 1
    installed.settings["runs"] = {"wait_seconds": 3}  # far less than the 60 s lease
    installed.write()
    crflow("verify", "-c", str(installed.path))


def test_a_killed_holder_elsewhere_blocks_the_site_only_until_its_lease_runs_out(crflow, installed):
    rotation = crflow.popen("rotate-credentials", "-c", str(installed.path), "--grace", "600")
    wait_for_task(crflow.api, installed, "grace_period")
    rotation.kill()  # SIGKILL: no release, no lease renewal any more
    rotation.wait()
    lock = installed.state / "site.lock"  # as if it had run on another machine (a worker): only the lease tells
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "boot": "another machine"}))

    installed.settings["runs"] = {"wait_seconds": 3}
    installed.write()
    busy = crflow("verify", "-c", str(installed.path), check=False)
    assert busy.returncode == 1
    line = busy.stderr.strip().splitlines()[-1]
    assert "is busy" in line and "holds it" in line and "runs.wait_seconds" in line

    installed.settings["runs"] = {"wait_seconds": 200}  # the 60 s lease, and time to notice it ran out
    installed.write()
    started = time.monotonic()
    crflow("verify", "-c", str(installed.path))
    assert time.monotonic() - started < 200


def test_runs_for_different_sites_do_not_wait_on_each_other(crflow, make_site):
    a, b = make_site(), make_site()
    crflow("install", "-c", str(a.path))
    crflow("install", "-c", str(b.path))
    rotation = crflow.popen("rotate-credentials", "-c", str(a.path), "--grace", "60")
    wait_for_task(crflow.api, a, "grace_period")
    b.settings["runs"] = {"wait_seconds": 1}  # would fail within a second if b had to wait for a
    b.write()
    crflow("verify", "-c", str(b.path))
    assert rotation.poll() is None  # a's rotation still holds a
    rotation.kill()
    rotation.wait()
