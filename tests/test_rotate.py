"""Rotation on the local target: `crflow rotate-credentials` and `crflow rotate-cert` against a
real registry process, watched by a client that keeps pulling through the whole rotation."""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time

import httpx

from conftest import run_name_prefix, task_runs
from crflow.errors import NotAnswering
from crflow.localpod import LocalPod
from crflow.oci import Registry, tiny_image


class PullLoop:
    """A consumer that pulls an image again and again, reading its login from an auth file
    before every pull, as a client does that is handed new credentials while it runs."""

    def __init__(self, url: str, ca_file, login, repo: str, digest: str):
        self.url, self.ca_file, self.login, self.repo, self.digest = url, ca_file, login, repo, digest
        self.ok, self.failures, self.users = 0, [], []
        self.kinds: list[type] = []  # the type of each failure, as callers tell failures apart
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            user, password = self.login()
            if user not in self.users:
                self.users.append(user)
            try:
                with Registry(self.url, self.ca_file, user, password, timeout=10) as registry:
                    registry.pull_image(self.repo, self.digest)
                self.ok += 1
            except Exception as err:
                self.failures.append(f"{time.strftime('%X')} {user}: {err}")
                self.kinds.append(type(err))
            time.sleep(0.05)

    def stop(self) -> PullLoop:
        self.running = False
        self.thread.join(timeout=30)
        return self


def push(site, repo: str = "team/app") -> str:
    user, password = site.login()
    with Registry(site.url, site.client / "ca.crt", user, password) as registry:
        return registry.push_image(repo, "v1", tiny_image({"app": b"payload"}))


def status(site, user: str, password: str) -> int:
    trust = ssl.create_default_context(cafile=site.client / "ca.crt")
    return httpx.get(f"{site.url}/v2/", auth=(user, password), verify=trust).status_code


def wait_for_pulls(loop: PullLoop, count: int, timeout: float = 60, failing: bool = False) -> None:
    """Until the client has pulled `count` more times (it has seen the registry answer); with
    no failure on the way, unless `failing` allows them (a restart's refused connections)."""
    wanted, deadline = loop.ok + count, time.monotonic() + timeout
    while loop.ok < wanted:
        assert time.monotonic() < deadline and (failing or not loop.failures), loop.failures[:5]
        time.sleep(0.05)


def htpasswd_users(site) -> list[str]:
    return [line.split(":")[0] for line in (site.state / "pod" / "volumes" / "auth" / "htpasswd").read_text().splitlines()]


def test_credential_rotation_fails_no_pull_and_keeps_the_registry_running(crflow, installed):
    digest, old = push(installed), installed.login()
    pid = installed.pod.pid()
    loop = PullLoop(installed.url, installed.client / "ca.crt", installed.login, "team/app", digest)
    wait_for_pulls(loop, 5)  # pulling with the old login
    run = crflow("rotate-credentials", "-c", str(installed.path), "--grace", "2")
    wait_for_pulls(loop, 5)  # and on, with the new one
    loop.stop()

    new = installed.login()
    assert new[0] != old[0] and new[1] != old[1]
    assert loop.failures == [] and loop.ok > 20, loop.failures[:5]
    assert loop.users == [old[0], new[0]]  # it switched to the new login while it ran
    assert status(installed, *old) == 401 and status(installed, *new) == 200
    assert htpasswd_users(installed) == [new[0]]
    assert installed.pod.pid() == pid  # the registry re-read htpasswd; no restart
    assert json.loads((installed.state / "generations.json").read_text())["credentials"] == 1
    assert not (installed.state / "rotation").exists()  # the two logins' work files are gone
    assert "generation 1" in run.stdout


def test_install_after_rotations_keeps_the_rotated_login_and_certificate(crflow, installed):
    crflow("rotate-credentials", "-c", str(installed.path), "--grace", "0")
    crflow("rotate-cert", "-c", str(installed.path))
    login, pid = installed.login(), installed.pod.pid()
    cert = (installed.state / "pod" / "volumes" / "tls" / "tls.crt").read_text()

    crflow("install", "-c", str(installed.path))
    assert installed.login() == login
    assert (installed.state / "pod" / "volumes" / "tls" / "tls.crt").read_text() == cert
    assert htpasswd_users(installed) == [login[0]]
    assert installed.pod.pid() == pid


def test_an_interrupted_rotation_finishes_with_the_same_new_user(crflow, installed):
    """Killed during its grace period (after the overlap began and the client files moved on),
    the rerun makes no second user: it finishes the rotation it had started."""
    old = installed.login()
    process = crflow.popen("rotate-credentials", "-c", str(installed.path), "--grace", "30")
    deadline = time.monotonic() + 60
    while installed.login() == old:  # step 4 done: the client files hold the new login
        assert time.monotonic() < deadline and process.poll() is None, process.stdout.read() if process.poll() else ""
        time.sleep(0.1)
    new = installed.login()
    process.kill()
    process.wait()
    assert sorted(htpasswd_users(installed)) == sorted([old[0], new[0]])  # interrupted in the overlap

    crflow("rotate-credentials", "-c", str(installed.path), "--grace", "0")
    assert installed.login() == new
    assert htpasswd_users(installed) == [new[0]]
    assert status(installed, *old) == 401


def test_certificate_renewal_restarts_the_local_registry_and_reports_the_gap(crflow, installed):
    """The registry loads its TLS pair at start, so the local target restarts it. A client
    trusting only the CA keeps working; it sees refused connections during the restart only."""
    digest = push(installed)
    before = LocalPod(installed.state / "pod").pid()
    loop = PullLoop(installed.url, installed.client / "ca.crt", installed.login, "team/app", digest)
    wait_for_pulls(loop, 5)
    started = time.monotonic()
    run = crflow("rotate-cert", "-c", str(installed.path))
    elapsed = time.monotonic() - started
    wait_for_pulls(loop, 5, failing=True)  # pulling again after the restart
    loop.stop()

    assert installed.pod.pid() != before
    assert "refused connections for" in run.stderr  # the run's log says how long
    # Only connections refused or cut by the restart (NotAnswering); no TLS error: the CA is the same.
    refused = [f for f, kind in zip(loop.failures, loop.kinds, strict=True) if kind is NotAnswering]
    assert refused == loop.failures, loop.failures[:3]
    print(f"certificate renewal on the local target: {len(refused)} of {loop.ok + len(refused)} pulls refused "
          f"during a {elapsed:.1f} s run")


def test_rotation_renews_a_certificate_that_expires_soon(crflow, installed):
    tls_crt = installed.state / "pod" / "volumes" / "tls" / "tls.crt"
    cert = tls_crt.read_text()
    crflow("rotate-credentials", "-c", str(installed.path), "--grace", "0", "--renew-cert-within", "30")
    assert tls_crt.read_text() == cert  # 365 days left: kept
    crflow("rotate-credentials", "-c", str(installed.path), "--grace", "0", "--renew-cert-within", "400")
    assert tls_crt.read_text() != cert
    assert json.loads((installed.state / "generations.json").read_text()) == {
        "credentials": 2, "rotating_to": None, "rotation_undone": False, "server_cert": 1, "renewing_cert": False,
        "ca": 0}


# Where a rotation is killed: after the n-th run of a task, in each of its steps 1-6.
KILL_POINTS = [("make_credentials", 2), ("put_local_secret", 1), ("push_pull_check", 1), ("save_client_bundle", 3),
               ("grace_period", 1), ("put_local_secret", 2), ("wait_for_login", 3)]


def test_killing_a_rotation_in_any_step_then_rerunning_finishes_it_with_one_new_user(crflow, installed):
    """SIGKILL the real `crflow rotate-credentials` the moment a task of each step reports
    completion, then rerun: each rotation ends one generation further, with the new user the
    killed run had made, the old login refused and the new one working."""
    generations = installed.state / "generations.json"
    for task, nth in KILL_POINTS:
        generation = json.loads(generations.read_text())["credentials"] if generations.exists() else 0
        old = installed.login()
        process = crflow.popen("rotate-credentials", "-c", str(installed.path), "--grace", "0")
        # Prefect's log line is only the trigger: if its wording changed the run would end
        # unkilled, and the return code says so.
        seen = 0
        for line in process.stdout:
            seen += f"Task run '{run_name_prefix(task)}" in line and "Finished in state" in line
            if seen == nth:
                process.kill()
                break
        assert process.wait() == -signal.SIGKILL, f"the run ended before {task} #{nth} finished"
        # The kill landed after the run had finished its work: the identity record's copy of the
        # generations is written before generations.json, so a kill between the two leaves only
        # the record committed, and the rerun rightly starts a rotation of its own.
        copies = [json.loads(generations.read_text()),
                  json.loads((installed.state / "identity.json").read_text())["generations"]]
        committed = any(copy["rotating_to"] is None for copy in copies)
        pending = installed.state / "rotation" / "new" / "auth.json"
        made = json.loads(pending.read_text()) if pending.exists() and not committed else None

        crflow("rotate-credentials", "-c", str(installed.path), "--grace", "0")
        new = installed.login()
        assert json.loads(generations.read_text())["credentials"] == generation + 1 + committed, \
            f"killed after {task} #{nth}: not exactly one rotation"
        if made is not None:
            assert json.loads((installed.client / "auth.json").read_text()) == made, f"a second new user after {task}"
        assert htpasswd_users(installed) == [new[0]]
        assert status(installed, *old) == 401 and status(installed, *new) == 200


def test_a_failed_local_rotation_puts_back_htpasswd_and_the_client_files(crflow, installed):
    """Step 3 fails (the registry is put in distribution's read-only mode, so the push with the
    new login gets 405): the rollback hooks restore the mounted htpasswd and auth.json."""
    installed.settings["chart"] = {"values": {"configData": {"storage": {"maintenance": {"readonly": {"enabled": True}}}}}}
    installed.write()
    assert crflow("install", "-c", str(installed.path), check=False).returncode == 1  # its own push fails: read-only
    htpasswd = installed.state / "pod" / "volumes" / "auth" / "htpasswd"
    before = {path: path.read_bytes() for path in (htpasswd, installed.client / "auth.json")}
    old = installed.login()

    result = crflow("rotate-credentials", "-c", str(installed.path), "--grace", "0", check=False)
    assert result.returncode == 1 and "was refused (405): the registry is read-only" in result.stderr.strip().splitlines()[-1]
    # The overlap had been written (and the new login accepted): what is back was put back, and
    # Prefect records the writing task as rolled back.
    assert ("put_local_secret", "RolledBack") in task_runs(crflow.api, installed.path)
    assert {path: path.read_bytes() for path in before} == before
    assert status(installed, *old) == 200
