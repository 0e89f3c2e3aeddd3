"""The failures a person is meant to read, as types: callers tell them apart by class, never
by their text. Every message is one line that names what is wrong and the fix, and never
holds a secret: it is shown as the CLI's error line and stored in Prefect's run state.
"""

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class CrflowError(Exception):
    """A failure the user can act on. Tasks do not retry it: a retry cannot fix a wrong setting."""


class Transient(CrflowError):
    """A failure a later try may not meet: the API's 409, 429 or 5xx, a connection refused or
    reset, a timeout, helm's "another operation is in progress". Tasks retry it; once their
    retries are spent, its one line is the error. Raised with the cause chained."""


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


def in_chain(err: BaseException, kind: type[E]) -> E | None:
    """The first `kind` in `err`'s chain (`err` itself, its cause and context, and the
    exceptions libraries keep as a `reason` or an argument, as urllib3 and requests do), or None."""
    seen, todo = set(), [err]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        todo += [e for e in (current.__cause__, current.__context__, getattr(current, "reason", None),
                             *getattr(current, "args", ())) if isinstance(e, BaseException)]
    return None


def is_transient(err: BaseException) -> bool:
    """Worth another try: a Transient, or a connection or timeout the libraries crflow calls
    raise as their own types. Anything else, a bug (KeyError, TypeError...) above all, is not."""
    if isinstance(err, (Transient, ConnectionError, TimeoutError)):
        return True
    # The transport errors of httpx (Prefect), requests (python-dxf: the registry) and urllib3
    # (Kubernetes, MinIO),
    # and S3's own "try again", by their module, so that this module imports none of them.
    kinds = {f"{kind.__module__}.{kind.__name__}" for kind in type(err).__mro__}
    if "minio.error.S3Error" in kinds:
        return getattr(err, "code", None) in _S3_TRY_AGAIN
    return bool(kinds & _TRANSPORT) or "minio.error.ServerError" in kinds


_TRANSPORT = {"httpx.TransportError", "requests.exceptions.ConnectionError", "requests.exceptions.Timeout",
              "requests.exceptions.ChunkedEncodingError", "urllib3.exceptions.ProtocolError", "urllib3.exceptions.TimeoutError",
              "urllib3.exceptions.NewConnectionError", "urllib3.exceptions.MaxRetryError",
              "ssl.SSLEOFError", "http.client.RemoteDisconnected", "http.client.IncompleteRead"}
_S3_TRY_AGAIN = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}


def transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry what is transient, and nothing else (a bug fails at once)."""
    try:
        state.result()
    except Exception as err:
        return is_transient(err)
    return False
