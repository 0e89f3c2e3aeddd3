"""The one exception type a person is meant to read."""


class CrflowError(Exception):
    """A failure the user can act on: the message names what is wrong and the fix.

    Its text is shown as the CLI's one-line error, so it never holds a secret.
    Tasks do not retry it: a retry cannot fix a wrong setting.
    """


def transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry everything but a CrflowError."""
    try:
        state.result()
    except CrflowError:
        return False
    except Exception:
        return True
    return False
