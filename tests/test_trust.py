"""`crflow trust`: this machine's runtimes trust the registry's CA for every address, and
`--remove` undoes exactly that. REAL: the local registry, skopeo and a real containerd are the
judges; nothing here is emulated. The skopeo test writes into this machine's
/etc/containers/certs.d (as the command is meant to), under a port no other registry uses,
and removes it again; it needs root and is skipped without it, saying so."""

from __future__ import annotations

import os

import pytest

from conftest import skopeo


def inspect(site, host: str) -> str:
    """skopeo inspect by `host`, with the auth file crflow wrote and no --cert-dir: only the
    system's trust decides."""
    result = skopeo("inspect", "--authfile", str(site.client / "auth.json"),
                    f"docker://{host}:{site.port}/crflow-smoke:install", check=False)
    return result.stdout if result.returncode == 0 else result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="writes /etc/containers/certs.d, which needs root")
def test_containers_trust_lets_skopeo_pull_by_every_address_and_remove_undoes_it(crflow, installed):
    site = installed
    assert "x509: certificate signed by unknown authority" in inspect(site, "localhost")
    out = crflow("trust", "-c", str(site.path), "--runtime", "containers").stdout
    try:
        for host in ("127.0.0.1", "localhost"):  # auth.json and the trust files name each address
            assert f"wrote /etc/containers/certs.d/{host}:{site.port}/ca.crt" in out
            assert '"Name"' in inspect(site, host)
        assert "nothing to change" in crflow("trust", "-c", str(site.path), "--runtime", "containers").stdout
    finally:
        removed = crflow("trust", "-c", str(site.path), "--runtime", "containers", "--remove").stdout
    assert removed.count("removed /etc/containers/certs.d/") == 2
    assert "x509: certificate signed by unknown authority" in inspect(site, "localhost")
    assert not any(p.name.endswith(f":{site.port}") for p in __import__("pathlib").Path(
        "/etc/containers/certs.d").iterdir())


def test_containerd_trust_under_a_root_is_enough_for_a_real_containerd(crflow, installed, tmp_path):
    from containerd import Containerd, Unavailable

    site, root = installed, tmp_path / "root"
    root.mkdir()
    certs_d = root / "etc" / "containerd" / "certs.d"
    try:
        runtime = Containerd(tmp_path / "containerd", certs_d)
    except Unavailable as why:
        pytest.skip(f"needs a real containerd: {why}")
    try:
        user, password = site.login()
        image = f"{site.server}/crflow-smoke:install"
        assert "400 Bad Request" in runtime.pull(image, user, password)  # no trust yet: containerd's own words
        crflow("trust", "-c", str(site.path), "--runtime", "containerd", "--root", str(root))
        assert runtime.pull(image, user, password) is None
        assert runtime.pull(f"localhost:{site.port}/crflow-smoke:install", user, password) is None
        assert "401 Unauthorized" in runtime.pull(image, user, password + "x")

        crflow("trust", "-c", str(site.path), "--runtime", "containerd", "--root", str(root), "--remove")
        assert list(certs_d.iterdir()) == []
    finally:
        runtime.stop()


def test_remove_leaves_what_crflow_did_not_write(crflow, installed, tmp_path):
    site = installed
    theirs = tmp_path / "etc" / "docker" / "certs.d" / f"localhost:{site.port}"
    theirs.mkdir(parents=True)
    (theirs / "client.cert").write_text("someone else's")
    out = crflow("trust", "-c", str(site.path), "--runtime", "docker", "--root", str(tmp_path)).stdout
    assert f"left {theirs} alone" in out  # a directory someone else made is not taken over
    mine = tmp_path / "etc" / "docker" / "certs.d" / site.server
    assert (mine / "ca.crt").read_text() == (site.client / "ca.crt").read_text()
    assert not (mine / "hosts.toml").exists()  # docker reads ca.crt only

    crflow("trust", "-c", str(site.path), "--runtime", "docker", "--root", str(tmp_path), "--remove")
    assert not mine.exists() and (theirs / "client.cert").read_text() == "someone else's"


def test_system_trust_under_a_root_writes_the_bundle_file_only(crflow, installed, tmp_path):
    site = installed
    out = crflow("trust", "-c", str(site.path), "--runtime", "system", "--root", str(tmp_path)).stdout
    path = tmp_path / f"usr/local/share/ca-certificates/crflow-registry-127.0.0.1_{site.port}.crt"
    assert path.read_text() == (site.client / "ca.crt").read_text()
    assert "update-ca-certificates" not in out  # only for the machine's own root
    crflow("trust", "-c", str(site.path), "--runtime", "system", "--root", str(tmp_path), "--remove")
    assert not path.exists()


@pytest.mark.parametrize(("args", "expected"), [
    (("--runtime", "podman"), "crflow: error: --runtime 'podman': use one of containerd, docker, containers, system"),
    (("--runtime", "docker", "--root", "/nonexistent"), "crflow: error: --root /nonexistent: not a directory"),
])
def test_bad_trust_input_gets_one_line(crflow, installed, args, expected):
    result = crflow("trust", "-c", str(installed.path), *args, check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [expected]


def test_trust_before_install_names_install(crflow, make_site):
    site = make_site()
    result = crflow("trust", "-c", str(site.path), "--runtime", "containers", check=False)
    assert result.returncode == 4
    assert result.stderr.strip().splitlines() == [
        "crflow: error: no CA for registry registry yet: run crflow install -c SITE first"]
