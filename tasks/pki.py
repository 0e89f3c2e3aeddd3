"""How do we make certificates? A long-lived CA, and a server certificate signed by it.

Clients and nodes trust only the CA (as with cert-manager), so the server certificate can
be renewed without touching them. IP entries go into the subjectAltName as IP addresses,
names as DNS names: a client connecting to 192.168.86.201 checks an IP SAN, not a DNS one.

    ca = make_ca("crflow registry CA", days=3650, key_algorithm="ecdsa-p256")
    server = make_server_cert(ca, ips=["127.0.0.1"], dns_names=["localhost"], days=365,
                              key_algorithm="ecdsa-p256")
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prefect import task
from prefect.cache_policies import INPUTS
from pydantic import BaseModel, SecretStr

from crflow.vault import identity_key


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate, as `openssl x509 -fingerprint -sha256` shows it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def fingerprint_of_pem(pem: str) -> str:
    return fingerprint(x509.load_pem_x509_certificate(pem.encode()))


class KeyPair(BaseModel):
    """A certificate and its private key. The key is a SecretStr: Prefect's cache keys,
    reprs and logs see only asterisks; the encrypted result store keeps the real value."""

    cert_pem: str
    key_pem: SecretStr

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def private_key(self):
        return serialization.load_pem_private_key(self.key_pem.get_secret_value().encode(), password=None)


def _new_key(algorithm: str):
    family, size = algorithm.split("-")
    if family == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=int(size))
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[size])


def _pair(cert: x509.Certificate, key) -> KeyPair:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyPair(cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem=key_pem.decode())


def _builder(subject: str, issuer: x509.Name | None, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate clock skew between machines
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def new_ca(common_name: str, days: int, key_algorithm: str) -> KeyPair:
    key = _new_key(key_algorithm)
    cert = (
        _builder(common_name, None, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _pair(cert, key)


def new_server_cert(ca: KeyPair, ips: list[str], dns_names: list[str], days: int, key_algorithm: str) -> KeyPair:
    ca_cert, ca_key = ca.cert, ca.private_key()
    key = _new_key(key_algorithm)
    sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(n) for n in dns_names]
    cert = (
        _builder((dns_names or ips)[0], ca_cert.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(  # what strict clients and linters expect of a TLS server key: sign, and for RSA encipher
            x509.KeyUsage(
                digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey), content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pair(cert, key)


def ca_record(common_name: str, generation: int) -> str:
    """The cache key of a CA: its name and generation alone, so changing its validity or key
    algorithm in the site file cannot silently replace the CA that every client trusts.
    (Generation 0 is the key the first release wrote.)"""
    return identity_key(common_name=common_name, generation=generation)


@task(task_run_name="CA {common_name} (generation {generation})",
      cache_key_fn=lambda context, inputs: ca_record(inputs["common_name"], inputs["generation"]))
def make_ca(common_name: str, days: int, key_algorithm: str, generation: int = 0) -> KeyPair:
    """The registry's certificate authority (a new generation only by `crflow install --new-ca`)."""
    return new_ca(common_name, days, key_algorithm)


@task(task_run_name="server certificate (generation {generation})", cache_policy=INPUTS)
def make_server_cert(
    ca: KeyPair, ips: list[str], dns_names: list[str], days: int, key_algorithm: str, generation: int
) -> KeyPair:
    """The registry's TLS certificate, signed by `ca`, for exactly these IPs and names."""
    return new_server_cert(ca, ips, dns_names, days, key_algorithm)


def days_left(cert: x509.Certificate) -> int:
    return (cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).days
