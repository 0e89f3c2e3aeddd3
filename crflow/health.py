"""Is the registry healthy? A small result type, and the check every target's status starts
from: one authenticated GET /v2/ with the client files, over TLS trusting only crflow's CA.
No Prefect here: `crflow status` answers in a fraction of a second.

    health = registry_health("https://127.0.0.1:5000", StateDir(state_dir).client)
    health.status is Status.HEALTHY, health.detail
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from crflow.errors import CrflowError, NotInstalled
from crflow.oci import Registry

if TYPE_CHECKING:
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
    """A mirror answers at `server` with the registry's login, and its upstream answers crflow."""
    health = registry_health(f"https://{server}", bundle_dir)
    if not health.healthy:
        return Health(health.status, f"mirror {mirror.name}: {health.detail}")
    return upstream_health(mirror.name, mirror.upstream, mirror.ca_bundle)


def upstream_health(name: str, upstream: str, ca_file: Path | None, timeout: float = 5) -> Health:
    """Does a mirror's upstream answer its registry API over TLS, trusting `ca_file` (else the
    system's CAs), as the mirror will? Any answer counts, a 401 too: the mirror logs in itself."""
    import ssl
    import urllib.error
    import urllib.request

    url = f"{upstream.rstrip('/')}/v2/"
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            pass
    except urllib.error.HTTPError:
        pass  # it answered
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            fix = "the mirror's ca_bundle is not its CA" if ca_file else "set the mirror's ca_bundle to its CA"
            return Health(Status.UNHEALTHY, f"mirror {name}: upstream {upstream} has a certificate crflow does not "
                                            f"trust ({reason.verify_message}); {fix}")
        return Health(Status.UNHEALTHY, f"mirror {name}: upstream {upstream} is not answering ({reason}); pulls "
                                        "through it serve only what it cached")
    except (TimeoutError, OSError) as err:
        return Health(Status.UNHEALTHY, f"mirror {name}: upstream {upstream} is not answering ({err}); pulls "
                                        "through it serve only what it cached")
    return Health(Status.HEALTHY, f"mirror {name}: upstream {upstream} answers")
