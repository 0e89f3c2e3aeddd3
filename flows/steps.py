"""Steps several flows share, the same on either target: the cached secrets of the
generations in use, the registry's storage and Secrets made ready, and a login's htpasswd."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr

from crflow.chart import SecretData, mirror_secrets, registry_secrets
from crflow.errors import CrflowError
from crflow.flows.site_lock import site_slug
from crflow.generations import Generations
from crflow.identity import Identity, guard
from crflow.settings import Site
from crflow.targets import HoldsState, Target
from crflow.tasks.credentials import Credentials, make_credentials, make_htpasswd, make_http_secret
from crflow.tasks.pki import KeyPair, ca_record, fingerprint_of_pem, make_ca, make_server_cert
from crflow.upstream import upstream_logins
from crflow.vault import Vault, open_vault


@dataclass(frozen=True)
class SiteSecrets:
    """What the registry needs that crflow generates, of the generations in use."""

    ca: KeyPair
    server_cert: KeyPair
    creds: Credentials
    htpasswd: SecretStr
    http_secret: SecretStr


def site_vault(site: Site, target: Target) -> Vault:
    """The site's encrypted cache: under state_dir, or in the bucket `result_storage` names."""
    remote = None
    if site.result_storage is not None:
        remote = target.store.result_cache(f"crflow-results-{site_slug(site)}", site.result_storage)
    return open_vault(site.state_dir, site.result_key, remote)


# Each of these checks what the cache gave against the site's identity record before it is
# used: a damaged cache or another key must stop the run, never make a second CA or login.
def site_ca(site: Site, vault: Vault, target: Target, new_ca: bool = False) -> KeyPair:
    """The site's CA. One is made only where no record of an earlier one exists, or when the
    user asked for a new one (`new_ca`): the old one's records stay, and it is never made again."""
    record, gens = Identity.load(site.state_dir), Generations.load(site.state_dir)
    name = f"crflow {site.release} CA"
    if new_ca:
        gens = gens.model_copy(update={"ca": gens.ca + 1}).save(site.state_dir)
        record = Identity.load(site.state_dir)
        record.retired_cas, record.ca = [*record.retired_cas, *([record.ca] if record.ca else [])], None
        record.save(site.state_dir)
    held_pem = target.held_ca() if isinstance(target, HoldsState) and record.ca is None and not new_ca else None
    held = fingerprint_of_pem(held_pem) if held_pem is not None else None
    if not new_ca and vault.holds(ca_record(name, gens.ca)) is False:  # a CA would be made now
        earlier = earlier_cas(site, target, record, held)
        if earlier:
            raise CrflowError(
                f"crflow will not make a new CA for {site.release}: {earlier[0]} names the one in use, and "
                f"{site.state_dir} has no record of it; restore {site.state_dir} (crflow restore), or make a new "
                "CA that every client and node must trust again with crflow install --new-ca")
    ca = vault(make_ca)(name, days=site.tls.ca_days, key_algorithm=site.tls.key_algorithm, generation=gens.ca)
    if held is not None and held != ca.fingerprint:
        raise CrflowError(
            f"the CA in {site.state_dir} ({ca.fingerprint}) is not the one the cluster holds for {site.release} "
            f"({held}); restore the state_dir that installed it (crflow restore)")
    if ca.fingerprint in record.retired_cas:
        raise CrflowError(f"the cache gave back a CA retired by --new-ca ({ca.fingerprint}); restore {site.state_dir}")
    guard(site.state_dir, "ca", "", ca.fingerprint)
    return ca


def earlier_cas(site: Site, target: Target, record: Identity, held: str | None) -> list[str]:
    """Every record of a CA this site already has, which a new CA would silently disown."""
    from crflow.backup import backups_beside
    from crflow.trust import trusted

    found = []
    if record.ca:
        found.append(f"the identity record {site.state_dir / 'identity.json'} ({record.ca})")
    if held:
        found.append(f"the cluster's CA Secret of {site.release} ({held})")
    if (target.bundle / "ca.crt").exists():
        found.append(f"the client file {target.bundle / 'ca.crt'}")
    found += [f"crflow trust's files for {runtime} under {root}" for runtime, root in trusted(site)]
    found += [f"the backup {path}" for path in backups_beside(site.state_dir)]
    return found


def server_cert(site: Site, vault: Vault, ca: KeyPair, generation: int) -> KeyPair:
    address, tls = site.registry, site.tls
    cert = vault(make_server_cert)(ca, address.ips, address.dns_names, days=tls.server_days,
                                   key_algorithm=tls.key_algorithm, generation=generation)
    made_for = f"generation {generation} for {','.join(address.ips + address.dns_names)}, {tls.server_days} days, " \
               f"{tls.key_algorithm}"
    if (ca_generation := Generations.load(site.state_dir).ca) > 0:  # signed by a CA that --new-ca made
        made_for += f", CA generation {ca_generation}"
    guard(site.state_dir, "server_certs", made_for, cert.fingerprint)
    return cert


def login(site: Site, vault: Vault, generation: int) -> tuple[Credentials, SecretStr]:
    """The credentials of one generation and their htpasswd line."""
    creds = vault(make_credentials)(site.auth.user, generation)
    guard(site.state_dir, "logins", f"generation {generation} of user {site.auth.user or '(generated)'}", creds.id)
    return creds, vault(make_htpasswd)(creds, cost=site.auth.bcrypt_cost)


def site_secrets(site: Site, vault: Vault, target: Target, new_ca: bool = False) -> SiteSecrets:
    """The registry's secrets, made once and cached: a long-lived CA, a server certificate for
    the addresses clients use, a login (user, random password, bcrypt in htpasswd) and the
    http.secret. Rotations move the generations on; every later run keeps what they made."""
    gens = Generations.load(site.state_dir)
    if gens.rotating_to is not None and not gens.rotation_undone:  # its new login may be in consumers' hands
        raise CrflowError(f"a login rotation to generation {gens.rotating_to} is under way; finish it first with "
                          "crflow rotate-credentials (this run would hand out the older login again)")
    ca = site_ca(site, vault, target, new_ca)
    creds, htpasswd = login(site, vault, gens.credentials)
    return SiteSecrets(ca=ca, server_cert=server_cert(site, vault, ca, gens.server_cert), creds=creds,
                       htpasswd=htpasswd, http_secret=vault(make_http_secret)())


def storage_and_secrets(site: Site, target: Target, secrets: SiteSecrets) -> SecretData:
    """What the registry's pod mounts, made ready: the namespace and its storage (a directory
    or volume, or the S3 bucket with MinIO's keys); returns every Secret the chart references,
    for the deploy."""
    target.prepare()
    target.store.prepare()
    s3_keys, s3_ca_pem = target.store.s3_secret()
    return mirror_secrets(site, upstream_logins(site)) | registry_secrets(
        site.release, ca_pem=secrets.ca.cert_pem, cert_pem=secrets.server_cert.cert_pem,
        key_pem=secrets.server_cert.key_pem, htpasswd=secrets.htpasswd, http_secret=secrets.http_secret,
        login=(secrets.creds.user, secrets.creds.password),
        s3_keys=s3_keys, s3_ca_pem=s3_ca_pem)
