"""No secret in a log line, flow parameter, artifact, exception message, result file or
cache key: after a real install and rotations of the login and the server certificate,
every place Prefect and crflow write to is searched for every secret they made."""

from __future__ import annotations

import os

import httpx


def secrets_of(site) -> dict[str, str]:
    user, password = site.login()
    volumes = site.state / "pod" / "volumes"
    environ = dict(
        item.split("=", 1) for item in open(f"/proc/{site.pod.pid()}/environ").read().split("\0") if "=" in item
    )
    key_pem = (volumes / "tls" / "tls.key").read_text()
    return {
        "password": password,
        "htpasswd hash": (volumes / "auth" / "htpasswd").read_text().split(":", 1)[1].strip(),
        # the base64 body past the PKCS#8 header (48 characters, the same for every P-256 key)
        "server key": "".join(key_pem.strip().splitlines()[1:-1])[48:88],
        "http.secret": environ["REGISTRY_HTTP_SECRET"],
        "result key": (site.state / "result.key").read_text().strip(),
    }


def api_dump(api: str) -> str:
    """Everything the Prefect API holds about runs, logs and artifacts, as one text."""
    parts = []
    with httpx.Client(base_url=api, timeout=30) as http:
        for path in ("/flow_runs/filter", "/task_runs/filter", "/artifacts/filter", "/logs/filter"):
            offset = 0
            while True:
                page = http.post(path, json={"limit": 200, "offset": offset}).raise_for_status().json()
                parts.append(str(page))
                offset += 200
                if len(page) < 200:
                    break
    return "\n".join(parts)


def assert_nowhere(secrets: dict[str, str], runs: list, site, prefect_api: str, prefect_home) -> None:
    """None of `secrets` is in the CLI output of `runs`, the Prefect API and database, or the result files."""
    assert all(len(value) >= 20 for value in secrets.values())
    places = {
        "CLI output": "".join(run.stdout + run.stderr for run in runs),
        "Prefect API (runs, task runs, artifacts, logs)": api_dump(prefect_api),
    }
    for db in prefect_home.glob("*.db*"):  # the SQLite database and its WAL, raw bytes
        places[f"Prefect database {db.name}"] = db.read_bytes().decode("latin-1")
    for result in (site.state / "results").iterdir():
        places[f"result file {result.name}"] = result.read_text()
    assert "crflow-install" in places["Prefect API (runs, task runs, artifacts, logs)"]  # we did look
    for where, text in places.items():
        for name, value in secrets.items():
            assert value not in text, f"the {name} is in the {where}"


def test_no_secret_reaches_prefect_logs_artifacts_results_or_output(crflow, make_site, prefect_api, prefect_home):
    site = make_site()
    runs = [crflow("install", "-c", str(site.path)) for _ in range(2)]
    secrets = secrets_of(site)
    runs += [crflow("rotate-credentials", "-c", str(site.path), "--grace", "0"), crflow("rotate-cert", "-c", str(site.path))]
    rotated = secrets_of(site)
    assert rotated["password"] != secrets["password"] and rotated["server key"] != secrets["server key"]
    secrets.update({f"{name} after rotation": value for name, value in rotated.items()})
    # gc hands the pod's Secrets to its collection, and verify and gc publish reports: neither leaks
    runs += [crflow("verify", "-c", str(site.path)), crflow("gc", "-c", str(site.path))]
    assert_nowhere(secrets, runs, site, prefect_api, prefect_home)
    registry_log = (site.state / "pod" / "registry.log").read_text()
    assert not any(value in registry_log for value in secrets.values())


def test_secret_files_are_private(installed):
    volumes = installed.state / "pod" / "volumes"
    # The pod's Secret files: as root, root's with the registry's group to read them (as a
    # kubelet makes them); as a user, that user's alone. Nobody else reads them.
    pod_group = 0o040 if os.geteuid() == 0 else 0
    for path in [volumes / "tls" / "tls.key", volumes / "auth" / "htpasswd", volumes / "config.yml"]:
        assert path.stat().st_mode & 0o077 == pod_group, f"{path} is readable by others"
        assert path.stat().st_uid == os.geteuid()
    for path in [installed.state / "result.key", installed.client / "auth.json"]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    for directory in [installed.state, installed.state / "results"]:
        assert directory.stat().st_mode & 0o077 == 0, f"{directory} is open to others"
    assert (volumes / "tls").stat().st_mode & 0o077 == (0o050 if pod_group else 0)
