"""Certificates and logins, as plain functions (no Prefect, no processes)."""

from __future__ import annotations

import base64
import json

import bcrypt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from crflow.tasks.credentials import htpasswd_line, new_credentials
from crflow.tasks.pki import new_ca, new_server_cert


@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def test_server_certificate_chains_to_the_ca(algorithm):
    ca = new_ca("test CA", days=30, key_algorithm=algorithm)
    server = new_server_cert(ca, ["192.168.86.201"], ["registry.lan"], days=10, key_algorithm=algorithm)
    server.cert.verify_directly_issued_by(ca.cert)
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    days = (server.cert.not_valid_after_utc - server.cert.not_valid_before_utc).days
    assert days == 10  # plus the five minutes of clock-skew allowance


def test_private_keys_stay_out_of_reprs_and_dumps():
    ca = new_ca("test CA", days=30, key_algorithm="ecdsa-p256")
    body = ca.key_pem.get_secret_value().splitlines()[1]
    assert body not in repr(ca) and body not in str(ca) and body not in ca.model_dump_json()


def test_password_has_192_random_bits_and_differs_each_time():
    a, b = new_credentials(None), new_credentials(None)
    assert len(base64.urlsafe_b64decode(a.password.get_secret_value() + "==")) * 8 == 192
    assert a.password.get_secret_value() != b.password.get_secret_value() and a.user != b.user
    assert new_credentials("alice").user == "alice"
    assert a.password.get_secret_value() not in repr(a)


def test_htpasswd_line_is_bcrypt_the_registry_accepts():
    creds = new_credentials("alice")
    line = htpasswd_line(creds, cost=5).get_secret_value()
    user, hashed = line.rstrip("\n").split(":", 1)
    assert user == "alice" and hashed.startswith("$2b$05$")
    assert bcrypt.checkpw(creds.password.get_secret_value().encode(), hashed.encode())


def test_auth_json_is_the_containers_auth_format():
    creds = new_credentials("alice")
    document = json.loads(creds.auth_json(["192.168.86.201:9005"]))
    auth = document["auths"]["192.168.86.201:9005"]["auth"]
    assert base64.b64decode(auth).decode() == f"alice:{creds.password.get_secret_value()}"
