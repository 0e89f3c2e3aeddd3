"""Where the result key comes from: a file (a Kubernetes Secret mounted into a job) or a Prefect
Secret block named in the site file. A key named there is never made: missing is an error."""

from __future__ import annotations

import subprocess

from cryptography.fernet import Fernet

from servers import BIN


def test_a_key_file_is_used_and_never_made(crflow, make_site, tmp_path):
    key_file = tmp_path / "mounted" / "result.key"
    key_file.parent.mkdir()
    key_file.write_bytes(Fernet.generate_key())
    site = make_site(result_key={"file": str(key_file)})
    crflow("install", "-c", str(site.path))
    assert not (site.state / "result.key").exists()

    key_file.unlink()  # the Secret was not mounted
    result = crflow("install", "-c", str(site.path), check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].endswith(f"result_key.file: {key_file} does not exist; mount the "
                                                   "result-key Secret there or set CRFLOW_RESULT_KEY")
    assert not key_file.exists() and not (site.state / "result.key").exists()


def test_a_prefect_secret_block_holds_the_key(crflow, make_site):
    key = Fernet.generate_key().decode()
    subprocess.run([str(BIN / "python"), "-c", "import sys; from prefect.blocks.system import Secret; "
                    "Secret(value=sys.stdin.read()).save('crflow-test-result-key', overwrite=True)"],
                   input=key, text=True, env=crflow.env, check=True, timeout=120)
    site = make_site(result_key={"prefect_secret": "crflow-test-result-key"})
    crflow("install", "-c", str(site.path))
    assert not (site.state / "result.key").exists()
    again = crflow("install", "-c", str(site.path), env={"CRFLOW_RESULT_KEY": Fernet.generate_key().decode()},
                   check=False)
    assert again.returncode == 1 and "wrong result key" in again.stderr.splitlines()[-1]  # the block's key made it

    other = make_site(result_key={"prefect_secret": "no-such-block"})
    missing = crflow("install", "-c", str(other.path), check=False)
    assert missing.returncode == 1
    assert missing.stderr.splitlines()[-1].endswith("result_key.prefect_secret: no Prefect Secret block named "
                                                    "'no-such-block'; create it with the site's result key")
