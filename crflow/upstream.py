"""A mirror's upstream login, read where the site file points (never written in it): the
environment crflow runs in, or a Prefect Secret block. A Kubernetes Secret reference is not
read here at all: the chart's mirror reads it in the cluster.

    logins = upstream_logins(site)  # mirror name -> (user, password), for those crflow reads
"""

from __future__ import annotations

import os

from pydantic import SecretStr

from crflow.errors import CrflowError
from crflow.settings import Mirror, Site

Login = tuple[str, SecretStr]


def upstream_login(mirror: Mirror) -> Login | None:
    """The login `mirror.login` points at, or None (anonymous, or a Kubernetes Secret's)."""
    ref = mirror.login
    if ref is None or ref.secret is not None:
        return None
    where = f"mirrors: {mirror.name}: login"
    if ref.env is not None:
        user, password = os.environ.get(f"{ref.env}_USERNAME"), os.environ.get(f"{ref.env}_PASSWORD")
        if not user or not password:
            raise CrflowError(f"{where}.env: set {ref.source} in the environment crflow runs in (a worker's, for "
                              "a deployment)")
        return user, SecretStr(password)
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(ref.prefect_secret).get()
    except ValueError:  # (its message names the block only; not passed on all the same)
        raise CrflowError(f"{where}.prefect_secret: Prefect has no Secret block named {ref.prefect_secret}; "
                          "create it with the value {\"username\": ..., \"password\": ...}") from None
    if not isinstance(value, dict) or not value.get("username") or not value.get("password"):
        raise CrflowError(f"{where}.prefect_secret: the value of Secret block {ref.prefect_secret} must be "
                          "{\"username\": ..., \"password\": ...}")
    return str(value["username"]), SecretStr(str(value["password"]))


def upstream_logins(site: Site) -> dict[str, Login]:
    """Every login crflow reads for the site's mirrors, by mirror name."""
    return {mirror.name: login for mirror in site.mirrors if (login := upstream_login(mirror)) is not None}
