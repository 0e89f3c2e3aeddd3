"""How do we make the registry's login? A user, a random password, and its htpasswd line.

    creds = new_credentials(user=None)                 # user "crflow-3f9a0c1d", 192-bit password
    line = htpasswd_line(creds, cost=5)               # "crflow-3f9a0c1d:$2b$05$..."

The htpasswd line is cached with the credentials it hashes: bcrypt salts every hash anew,
so computing it again would change the file on every run (and restart the registry in a
GitOps setup) although nothing changed.
"""

from __future__ import annotations

import base64
import json
import secrets

import bcrypt
from prefect import task
from prefect.cache_policies import INPUTS
from pydantic import BaseModel, SecretStr

from crflow.vault import identity_key

PASSWORD_BYTES = 24  # 192 random bits, URL-safe text of 32 characters


class Credentials(BaseModel):
    """A registry login. `id` is random and public: it tells credentials apart in cache keys
    and artifacts without revealing the password, which Prefect only ever sees as asterisks."""

    user: str
    password: SecretStr
    id: str

    def docker_auth(self) -> str:
        """base64(user:password), the `auth` field of a docker/containers auth file."""
        raw = f"{self.user}:{self.password.get_secret_value()}"
        return base64.b64encode(raw.encode()).decode()

    def auth_json(self, servers: list[str]) -> str:
        """A containers-auth.json (or .dockerconfigjson) document: one entry for every address
        (host:port) the registry answers on, since clients look the login up by the name they use."""
        return json.dumps({"auths": {server: {"auth": self.docker_auth()} for server in servers}}, indent=2)


def new_credentials(user: str | None) -> Credentials:
    return Credentials(
        user=user or f"crflow-{secrets.token_hex(4)}",
        password=secrets.token_urlsafe(PASSWORD_BYTES),
        id=secrets.token_hex(8),
    )


def htpasswd_line(creds: Credentials, cost: int) -> SecretStr:
    hashed = bcrypt.hashpw(creds.password.get_secret_value().encode(), bcrypt.gensalt(rounds=cost))
    return SecretStr(f"{creds.user}:{hashed.decode()}\n")


@task(task_run_name="login (generation {generation})", cache_policy=INPUTS)
def make_credentials(user: str | None, generation: int) -> Credentials:
    """The registry login of one generation: a fresh random password, and a user generated
    when `user` is None, else `user` (generation 0) and `user-N` after rotations. Each
    generation has its own user: htpasswd holds one hash per user, and during a rotation
    the old login and the new one both work."""
    return new_credentials(f"{user}-{generation}" if user and generation else user)


@task(task_run_name="htpasswd entry (bcrypt cost {cost})", cache_policy=INPUTS)
def make_htpasswd(creds: Credentials, cost: int) -> SecretStr:
    """The htpasswd file content for `creds` (bcrypt, `$2b$`, which the registry accepts)."""
    return htpasswd_line(creds, cost)


# One per site; ("generation": 0) keeps the key the first release wrote, when this task had
# a generation parameter nobody set.
@task(task_run_name="http.secret", cache_key_fn=lambda context, inputs: identity_key(generation=0))
def make_http_secret() -> SecretStr:
    """The registry's http.secret: replicas share it to sign upload state."""
    return SecretStr(secrets.token_urlsafe(32))
