"""Every CRFLOW_* environment variable crflow reads, named once and validated when read: a bad
value is one line naming the variable and what it takes.

    environment().home              # $CRFLOW_HOME, else ~/.local/share/crflow

A pydantic model over os.environ, not pydantic-settings: importing that costs every command
about 0.1 s, and `crflow status` answers in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from crflow.errors import CrflowError

PREFIX = "CRFLOW_"
OWN_PREFECT = PREFIX + "OWN_PREFECT"  # crflow sets it for itself and the processes it starts
RESULT_KEY = PREFIX + "RESULT_KEY"  # named in messages that tell where the key may come from
BACKUP_PASSPHRASE = PREFIX + "BACKUP_PASSPHRASE"


class Environment(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    home: Path = Path("~/.local/share/crflow")  # crflow's data folder: its Prefect server, the helm it fetched
    prefect_port: Annotated[int, Field(ge=1, le=65535)] = 4200  # where crflow's own Prefect server listens
    own_prefect: bool = False  # crflow set it: the Prefect server is crflow's (for its child processes too)
    helm: Path | None = None  # the helm binary, chosen by the user
    registry_binary: Path | None = None  # distribution's binary (default: docker-registry on PATH)
    result_key: SecretStr | None = None  # the key of the encrypted cache (else the site's result_key)
    sites: Path | None = None  # where a relative site file is found (a Job mounts its site files there)
    backup_passphrase: SecretStr | None = None  # for backup and restore without a terminal


def environment() -> Environment:
    """The CRFLOW_* variables as they are now (an empty one counts as unset)."""
    values = {name.removeprefix(PREFIX).lower(): value for name, value in os.environ.items()
              if name.startswith(PREFIX) and value}
    try:
        return Environment.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        raise CrflowError(f"{PREFIX}{str(first['loc'][0]).upper()}: {first['msg'].lower()}") from None
