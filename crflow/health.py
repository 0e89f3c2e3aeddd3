"""Is the registry healthy? A small result type, and the check every target's status starts
from: one authenticated GET /v2/ with the client files, over TLS trusting only crflow's CA.
No Prefect here: `crflow status` answers in a fraction of a second.

    health = registry_health("https://127.0.0.1:5000", StateDir(state_dir).client)
    health.status is Status.HEALTHY, health.detail
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from crflow.errors import CrflowError, NotInstalled
from crflow.oci import Registry

if TYPE_CHECKING:
    from pydantic import SecretStr

    from crflow.settings import Mirror


class Status(enum.IntEnum):
    """How a site is, valued as `crflow status` exits."""

    HEALTHY = 0
    UNHEALTHY = 3
    NOT_INSTALLED = 4
    READ_ONLY = 5  # read-only maintenance: a gc's window, or one a stopped gc left (status then ends it)


@dataclass(frozen=True)
class Health:
    status: Status
    detail: str  # one line: what was found, and what to do about it

    @property
    def healthy(self) -> bool:
        return self.status is Status.HEALTHY


def registry_health(base_url: str, bundle_dir: Path) -> Health:
    try:
        with Registry.from_bundle(base_url, bundle_dir, timeout=5) as registry:
            registry.ping()
    except NotInstalled as err:
        return Health(Status.NOT_INSTALLED, f"{err}; run crflow install")
    except (CrflowError, ConnectionError) as err:
        return Health(Status.UNHEALTHY, str(err))
    return Health(Status.HEALTHY, f"{base_url} answers over TLS, login of user {registry.user} accepted")


def mirror_health(mirror: Mirror, server: str, bundle_dir: Path) -> Health:
    """A mirror answers at `server` with the registry's login, and its upstream answers crflow
    and takes the mirror's upstream login (where crflow reads it: not a Kubernetes Secret's)."""
    from crflow.upstream import upstream_login

    health = registry_health(f"https://{server}", bundle_dir)
    if not health.healthy:
        return Health(health.status, f"mirror {mirror.name}: {health.detail}")
    try:
        login = upstream_login(mirror)
    except CrflowError as err:
        return Health(Status.UNHEALTHY, str(err))
    return upstream_health(mirror, login)


def _challenge(url: str, context, timeout: float, headers: dict | None = None) -> tuple[int, str, dict[str, str]]:
    """GET `url`: (status, the WWW-Authenticate scheme in lower case or "", its parameters)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout,
                                    context=context) as answer:
            return answer.status, "", {}
    except urllib.error.HTTPError as answer:
        scheme, _, rest = (answer.headers.get("WWW-Authenticate") or "").partition(" ")
        return answer.code, scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def upstream_health(mirror: Mirror, login: tuple[str, SecretStr] | None, timeout: float = 5) -> Health:
    """Does a mirror's upstream answer its registry API over TLS, trusting the system's CAs and
    the mirror's ca_bundle (as the mirror's pod does), and take `login`? distribution's proxy
    logs in only after a Bearer challenge, so an upstream asking for Basic passes no pull."""
    import base64
    import ssl
    import urllib.error
    import urllib.parse

    name, upstream = mirror.name, mirror.upstream.rstrip("/")
    context = ssl.create_default_context()
    if mirror.ca_bundle is not None:
        context.load_verify_locations(cafile=str(mirror.ca_bundle))
    gone = f"mirror {name}: upstream {upstream} is not answering"
    try:
        _, scheme, params = _challenge(f"{upstream}/v2/", context, timeout)
        if scheme == "basic":
            return Health(Status.UNHEALTHY, f"mirror {name}: upstream {upstream} asks for a Basic login, which "
                                            "distribution's proxy never sends (it logs in only after a Bearer "
                                            "challenge); no pull through the mirror can pass")
        realm = params.get("realm", "")
        if scheme != "bearer" or login is None or not realm.startswith("https://"):
            return Health(Status.HEALTHY, f"mirror {name}: upstream {upstream} answers")
        gone = f"mirror {name}: the token service of upstream {upstream} ({realm}) is not answering"
        user, password = login
        basic = base64.b64encode(f"{user}:{password.get_secret_value()}".encode()).decode()
        status, _, _ = _challenge(f"{realm}?{urllib.parse.urlencode({'service': params.get('service', '')})}",
                                  context, timeout, {"Authorization": f"Basic {basic}"})
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            fix = "the mirror's ca_bundle is not its CA" if mirror.ca_bundle else "set the mirror's ca_bundle to its CA"
            return Health(Status.UNHEALTHY, f"mirror {name}: upstream {upstream} has a certificate crflow does not "
                                            f"trust ({reason.verify_message}); {fix}")
        return Health(Status.UNHEALTHY, f"{gone} ({reason}); pulls through it serve only what it cached")
    except (TimeoutError, OSError) as err:
        return Health(Status.UNHEALTHY, f"{gone} ({err}); pulls through it serve only what it cached")
    if status in (401, 403):
        return Health(Status.UNHEALTHY, f"mirror {name}: upstream {upstream} refused the login from "
                                        f"{mirror.login.source} ({status} from its token service); fix it there")
    return Health(Status.HEALTHY, f"mirror {name}: upstream {upstream} answers and takes the mirror's login")
