"""A red team's attacks on the local target, each a real one against real files and processes:
links planted where crflow (as root) writes, records lost in every order, purges of folders
that hold other people's files, values that would weaken the registry, two sites with one
release name, a gc killed in its read-only window, another site's backup. The judges are the
kernel (owners, modes, mounts), curl and skopeo; nothing is emulated."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from conftest import curl_status, oci_layout, skopeo
from crflow.tasks.pki import ca_record

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks aim at crflow running as root")


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def victim(tmp_path: Path) -> Path:
    """A root-owned private file that a planted link points at."""
    path = tmp_path / "victim"
    path.write_text("precious")
    os.chmod(path, 0o600)
    return path


def untouched(path: Path) -> bool:
    info = path.stat()
    return path.read_text() == "precious" and (info.st_uid, info.st_gid) == (0, 0) and info.st_mode & 0o777 == 0o600


def plant(link: Path, target: Path, uid: int | None = None) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    if uid is not None:
        os.lchown(link, uid, uid)


@ROOT_ONLY
def test_links_planted_at_every_name_crflow_writes_redirect_nothing(crflow, installed, tmp_path):
    site, target = installed, victim(tmp_path)
    # At each file crflow keeps, the temporary name the earlier writer used, and for the
    # registry's own volumes the names themselves.
    for path in [p for p in site.state.rglob("*") if p.is_file() and "data" not in p.parts]:
        plant(path.with_name(f".{path.name}.partial"), target)
    for name in ("htpasswd",):
        plant(site.state / "pod" / "volumes" / "auth" / name, target)
    crflow("install", "-c", str(site.path))  # writes every volume file: over the link, not through it
    crflow("rotate-credentials", "-c", str(site.path), "--grace", "0")
    assert untouched(target)
    assert curl_status(site, *site.login()) == 200
    htpasswd = site.state / "pod" / "volumes" / "auth" / "htpasswd"
    assert not htpasswd.is_symlink() and htpasswd.stat().st_uid == 0  # root's file, the pod's group reads it

    # The registry's view of its volumes is read-only, even for root; its data folder is not.
    jail = Path(f"/proc/{site.pod.pid()}/root/run/crflow-registry")
    with pytest.raises(OSError) as refused:
        (jail / "volumes" / "auth" / "planted").write_text("x")
    assert refused.value.errno == errno.EROFS
    data = next((jail / "claims").iterdir())
    (data / "probe").write_text("x")
    (data / "probe").unlink()


@ROOT_ONLY
def test_the_registry_user_cannot_redirect_the_ownership_walk_of_its_data(crflow, installed, tmp_path):
    site, target = installed, victim(tmp_path)
    data = site.state / "data"
    # The registry's user owns its data: it can plant a link there, and crflow walks the
    # tree to hand it over when its top is not the registry's (as after a restore).
    plant(data / "docker" / "planted", target, uid=1000)
    os.chown(data, 0, 0)
    site.pod.stop()
    crflow("install", "-c", str(site.path))
    assert untouched(target)
    assert (data.stat().st_uid, (data / "docker").stat().st_uid) == (1000, 1000)


@ROOT_ONLY
def test_backup_into_a_shared_folder_with_a_planted_link(crflow, installed, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp
    target = victim(tmp_path)
    out = shared / "site.crflow-backup"
    plant(out, target, uid=1000)  # another user's links: at the name crflow is told to write,
    plant(shared / f".{out.name}.partial", target, uid=1000)  # and where the earlier writer put it first
    env = {"CRFLOW_BACKUP_PASSPHRASE": "correct horse"}
    crflow("backup", "-c", str(installed.path), "--out", str(out), env=env)
    assert untouched(target) and not out.is_symlink() and out.stat().st_mode & 0o777 == 0o600


@ROOT_ONLY
def test_trust_never_follows_a_link_out_of_its_root(crflow, installed, tmp_path):
    site, root, elsewhere = installed, tmp_path / "root", tmp_path / "elsewhere"
    elsewhere.mkdir()
    certs_d = root / "etc" / "containers" / "certs.d"
    certs_d.mkdir(parents=True)
    (certs_d / site.server).symlink_to(elsewhere)
    result = crflow("trust", "-c", str(site.path), "--runtime", "containers", "--root", str(root), check=False)
    assert result.returncode == 1 and "is a symbolic link inside the tree crflow writes into" in last_line(result)
    assert list(elsewhere.iterdir()) == []

    (root / "usr" / "local" / "share").mkdir(parents=True)
    (root / "usr" / "local" / "share" / "ca-certificates").symlink_to(elsewhere)
    result = crflow("trust", "-c", str(site.path), "--runtime", "system", "--root", str(root), check=False)
    assert result.returncode == 1 and "symbolic link" in last_line(result)
    assert list(elsewhere.iterdir()) == []


def generations(site) -> dict:
    return json.loads((site.state / "generations.json").read_text())


@pytest.mark.parametrize("order", [("generations.json", "identity.json"), ("identity.json", "generations.json")])
def test_records_lost_in_either_order_keep_the_current_login(crflow, installed, order):
    site = installed
    for _ in range(2):
        crflow("rotate-credentials", "-c", str(site.path), "--grace", "0")
    current = site.login()
    for name in order:
        (site.state / name).unlink()
        crflow("install", "-c", str(site.path))
        assert (site.state / name).exists()  # written again at once, from the other
        assert generations(site)["credentials"] == 2 and site.login() == current
    assert curl_status(site, *current) == 200


def test_a_new_key_on_a_state_dir_that_lost_its_records_makes_no_new_ca(crflow, installed):
    site = installed
    ca_file = site.state / "results" / ca_record("crflow registry CA", 0)
    before = ca_file.read_bytes(), (site.client / "ca.crt").read_bytes()
    (site.state / "identity.json").unlink()
    (site.state / "results" / ".keycheck").unlink()
    other_key = {"CRFLOW_RESULT_KEY": Fernet.generate_key().decode()}
    result = crflow("install", "-c", str(site.path), check=False, env=other_key)
    assert result.returncode == 1 and "wrong result key" in last_line(result), result.stderr
    assert not (site.state / "results" / ".keycheck").exists()  # the wrong key was not taken as the site's

    # The cache gone too: the client files still name the CA in use.
    for record in (site.state / "results").iterdir():
        record.unlink()
    result = crflow("install", "-c", str(site.path), check=False, env=other_key)
    assert result.returncode == 1 and "crflow will not make a new CA for registry: the client file" in \
        last_line(result) and "--new-ca" in last_line(result)
    assert (site.client / "ca.crt").read_bytes() == before[1]


def test_new_ca_is_asked_for_and_keeps_the_old_ones_record(crflow, installed):
    site = installed
    ca_file = site.state / "results" / ca_record("crflow registry CA", 0)
    old_record, old_ca = ca_file.read_bytes(), (site.client / "ca.crt").read_bytes()
    refused = crflow("install", "-c", str(site.path), "--new-ca", check=False)
    assert refused.returncode == 1 and "add --yes" in last_line(refused)
    crflow("install", "-c", str(site.path), "--new-ca", "--yes")
    assert (site.client / "ca.crt").read_bytes() != old_ca and ca_file.read_bytes() == old_record
    record = json.loads((site.state / "identity.json").read_text())
    assert len(record["retired_cas"]) == 1 and generations(site)["ca"] == 1
    crflow("install", "-c", str(site.path))  # a rerun keeps the new one
    assert curl_status(site, *site.login()) == 200


def test_purge_removes_only_what_crflow_made(crflow, make_site):
    site = make_site()
    folder = site.path.parent  # `state_dir: .`: beside the site file, the user's notes and another folder
    (folder / "notes.txt").write_text("mine")
    (folder / "other").mkdir()
    (folder / "other" / "keep.txt").write_text("mine too")
    site.settings["state_dir"] = "."
    site.state = folder
    site.write()
    crflow("install", "-c", str(site.path))
    out = crflow("uninstall", "-c", str(site.path), "--purge", "--yes").stdout
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "other", "site.yaml"]
    assert (folder / "other" / "keep.txt").read_text() == "mine too"
    assert "crflow did not make them" in out and "notes.txt" in out


@pytest.mark.parametrize("where", ["/", "home", "mount point"])
def test_purge_refuses_a_state_dir_it_must_not_empty(crflow, make_site, tmp_path, where):
    site = make_site()
    if where == "mount point":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        state = tmp_path / "mounted"
        state.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "crflow-test", str(state)], check=True)
        (state / "theirs").write_text("x")
    else:
        state = Path("/") if where == "/" else Path.home()
    try:
        site.settings["state_dir"] = str(state)
        site.write()
        before = sorted(os.listdir(state))
        result = crflow("uninstall", "-c", str(site.path), "--purge", "--yes", check=False)
        assert result.returncode == 1 and "crflow will not purge it" in last_line(result)
        assert sorted(os.listdir(state)) == before
    finally:
        if where == "mount point":
            subprocess.run(["umount", str(state)], check=True)


def test_restore_refuses_another_sites_backup(crflow, installed, make_site, tmp_path):
    env = {"CRFLOW_BACKUP_PASSPHRASE": "correct horse"}
    backup = tmp_path / "a.crflow-backup"
    crflow("backup", "-c", str(installed.path), "--out", str(backup), env=env)
    other = make_site()  # another port: another site
    result = crflow("restore", "-c", str(other.path), str(backup), check=False, env=env)
    assert result.returncode == 1 and "is the backup of another site (servers" in last_line(result)
    assert not other.state.exists()


@pytest.mark.parametrize(("values", "expected"), [
    ({"podSecurityContext": {"runAsUser": 0}}, "chart.values.podSecurityContext.runAsUser: 0 runs the registry as root"),
    ({"containerSecurityContext": {"runAsUser": 0}}, "chart.values.containerSecurityContext.runAsUser: 0"),
    ({"containerSecurityContext": {"privileged": True}}, "privileged: a privileged registry is root on the host"),
    ({"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}, "capabilities.add: the registry needs"),
    ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem: false"),
    ({"configData": {"storage": {"filesystem": {"rootdirectory": "/elsewhere"}}}},
     "chart.values.configData.storage.filesystem: crflow sets the registry's storage"),
])
def test_values_that_weaken_the_registry_are_refused(crflow, make_site, values, expected):
    site = make_site(chart={"values": values})
    result = crflow("install", "-c", str(site.path), check=False)
    assert result.returncode == 1 and expected in last_line(result) and len(result.stderr.splitlines()) == 1
    assert not site.state.exists()
    site.settings["chart"]["allowInsecureValues"] = True  # not on this machine, whatever it says
    site.write()
    assert crflow("install", "-c", str(site.path), check=False).returncode == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="kills a crflow run by its process group")
@pytest.mark.parametrize("between_processes", [False, True], ids=["in-the-window", "between-stop-and-start"])
def test_a_gc_killed_in_its_read_only_window_is_ended_by_status(crflow, installed, tmp_path, between_processes):
    site = installed
    gc = crflow.popen("gc", "-c", str(site.path))
    deadline = time.monotonic() + 120
    while not (site.pod.is_read_only() and site.pod.pid() is not None and (site.state / "pod" / "writable.json")
               .exists()) and gc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.poll() is None, "gc ended before its window could be caught"
    gc.send_signal(signal.SIGKILL)
    gc.wait(timeout=30)
    if between_processes:  # a gc killed after it stopped one registry process and before it started the next
        site.pod.stop()
    status = crflow("status", "-c", str(site.path), check=False)
    assert status.returncode == 5 and "read-only (maintenance)" in status.stdout
    assert "write mode is restored" in status.stdout
    assert crflow("status", "-c", str(site.path), check=False).returncode == 0
    # skopeo, not crflow, judges that pushes are taken again.
    oci_layout(tmp_path / "layout", "v1")
    skopeo("copy", "--dest-authfile", str(site.client / "auth.json"), "--dest-cert-dir", str(site.client),
           f"oci:{tmp_path / 'layout'}:v1", f"docker://{site.server}/team/after-gc:v1")
    crflow("verify", "-c", str(site.path))


def test_a_full_state_disk_is_one_line_and_leaves_nothing_half_written(crflow, make_site, tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        site = make_site(state_dir=str(disk / "state"), storage={"kind": "filesystem", "path": str(tmp_path / "data")})
        crflow("install", "-c", str(site.path))
        with open(disk / "filler", "wb") as filler:
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        result = crflow("verify", "-c", str(site.path), check=False)
        assert result.returncode == 1 and "no space left on the device of" in last_line(result), result.stderr
        assert not [p for p in disk.rglob("*") if p.name.endswith(".partial")]
        (disk / "filler").unlink()
        crflow("verify", "-c", str(site.path))
    finally:
        site.pod.stop()
        subprocess.run(["umount", "-l", str(disk)])


def test_a_closed_pipe_is_one_line_and_a_non_zero_exit(installed):
    from servers import BIN

    read, write = os.pipe()
    os.close(read)  # a reader that has gone (as `| head -1` after its line): every write breaks the pipe
    try:
        run = subprocess.run([str(BIN / "crflow"), "status", "-c", str(installed.path)], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, "PREFECT_API_URL": "x"})
    finally:
        os.close(write)
    assert run.returncode == 141
    assert run.stderr.splitlines() == ["crflow: error: the output was closed before crflow finished writing it "
                                       "(broken pipe)"]


def test_the_local_prefect_server_asks_for_a_credential(crflow, make_site, tmp_path):
    from servers import free_port

    token = "hook-token-0123456789abcdef"
    site = make_site(alerts={"webhook": f"http://127.0.0.1:9/notify?token={token}"})
    home = tmp_path / "own-home"
    env = {"PREFECT_API_URL": "", "CRFLOW_HOME": str(home), "CRFLOW_PREFECT_PORT": str(free_port())}
    own = {k: v for k, v in {**crflow.env, **env}.items() if k != "PREFECT_API_URL"}
    started = subprocess.run([crflow.binary, "server", "start"], env=own, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    try:
        subprocess.run([crflow.binary, "deploy", "-c", str(site.path), "--pool", "hardening"], env=own, check=True,
                       capture_output=True, timeout=300)
        api = f"http://127.0.0.1:{env['CRFLOW_PREFECT_PORT']}/api/block_documents/filter"
        ask = ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", "-H", "Content-Type: application/json",
               "-d", '{"include_secrets": true}', api]
        anyone = subprocess.run(ask, capture_output=True, text=True, timeout=30).stdout
        assert anyone.endswith("\n401") and token not in anyone
        credential = (home / "prefect" / "api-auth").read_text().strip()
        assert (home / "prefect" / "api-auth").stat().st_mode & 0o777 == 0o600
        holder = subprocess.run([*ask[:-1], "-u", credential, api], capture_output=True, text=True, timeout=30).stdout
        assert holder.endswith("\n200") and token in holder  # the block holds it: only the credential reads it
    finally:
        subprocess.run([crflow.binary, "server", "stop"], env=own, capture_output=True, timeout=60)


def test_two_sites_with_one_release_name_keep_their_own_trust_files(crflow, installed, make_site, tmp_path):
    first, second = installed, make_site()  # both `release: registry`, as every example has it
    crflow("install", "-c", str(second.path))
    root = tmp_path / "root"
    root.mkdir()

    def files() -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    for runtime in ("containerd", "system"):
        for site in (first, second, first):  # the first again: a re-trust must not take the second's away
            crflow("trust", "-c", str(site.path), "--runtime", runtime, "--root", str(root))
    ours = {site: {f for f in files() if str(site.port) in f} for site in (first, second)}
    assert len(ours[first]) == len(ours[second]) == 2 * 3 + 1  # 2 addresses x (ca.crt, hosts.toml, mark); 1 bundle file
    for runtime in ("containerd", "system"):
        crflow("trust", "-c", str(first.path), "--runtime", runtime, "--root", str(root), "--remove")
    assert files() == ours[second]
    for runtime in ("containerd", "system"):
        crflow("trust", "-c", str(second.path), "--runtime", runtime, "--root", str(root), "--remove")
    assert files() == set()
