"""The failures a person is meant to read, as types: callers tell them apart by class, never
by their text. Every message is one line that names what is wrong and the fix, and never
holds a secret: it is shown as the CLI's error line and stored in Prefect's run state.
"""


class CrflowError(Exception):
    """A failure the user can act on. Tasks do not retry it: a retry cannot fix a wrong setting."""


class NotInstalled(CrflowError):
    """The site has no registry yet (no client files, no release, no local pod)."""


class LoginRefused(CrflowError):
    """The registry answered 401 to crflow's login."""


class TlsFailure(CrflowError):
    """The registry's certificate is not signed by crflow's CA, or does not name the address."""


class StorageFailure(CrflowError):
    """The registry answered, but its storage driver failed (a missing bucket, a full disk...)."""


class DiskFull(CrflowError):
    """A file crflow writes did not fit on its device; the old file, if any, is unchanged."""


class NotAnswering(ConnectionError):
    """Nothing answers at the registry's address (refused, reset, timed out). Transient:
    tasks retry it, and once the retries are spent its message is the whole story."""


def transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry everything but a CrflowError."""
    try:
        state.result()
    except CrflowError:
        return False
    except Exception:
        return True
    return False
