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

from crflow.errors import CrflowError, NotInstalled
from crflow.oci import Registry


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
