"""What does a person see in the Prefect UI after a run? A short markdown summary, with
addresses, fingerprints and dates, and never a secret."""

from __future__ import annotations

import datetime as dt
import json
import time

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.context import FlowRunContext

from crflow.tasks.pki import KeyPair, days_left


def certificate_rows(ca: KeyPair, server_cert: KeyPair) -> list[tuple[str, str]]:
    def expiry(pair: KeyPair) -> str:
        return f"{pair.cert.not_valid_after_utc:%Y-%m-%d} ({days_left(pair.cert)} days)"

    return [
        ("CA fingerprint (SHA-256)", f"`{ca.fingerprint}`"),
        ("CA expires", expiry(ca)),
        ("Server certificate expires", expiry(server_cert)),
    ]


def markdown_table(title: str, rows: list[tuple[str, str]]) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


@task(task_run_name="summary {key}")
def publish_summary(key: str, title: str, rows: list[tuple[str, str]]) -> None:
    """A markdown artifact under `key`, so the UI shows the latest one of each kind."""
    create_markdown_artifact(key=key, markdown=markdown_table(title, rows), description=title)


HISTORY = 30  # rows kept in a site's verify table


def first_failed(rows: list[dict]) -> str | None:
    """The name of the first check that did not pass (None: all passed)."""
    return next((r["check"] for r in rows if r["result"] != "ok"), None)


class Checks:
    """Runs checks in order, timing each, and publishes what happened when the block ends,
    passed or failed: a markdown artifact, and a row on top of the site's verify table
    (`history_key`, the last 30 runs). The error leaving the block is prefixed with the name of
    the check that failed first, so the run's state (and any alert made from it) says which."""

    def __init__(self, title: str, server: str, history_key: str):
        self.title, self.server, self.history_key = title, server, history_key
        self.rows: list[dict] = []
        self.figures: dict[str, str] = {}

    def check(self, name: str, fn, *args):
        started = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as err:
            self.rows.append({"check": name, "result": "FAILED", "seconds": time.perf_counter() - started,
                              "detail": str(err)[:300]})
            raise
        detail = result if isinstance(result, str) else ""
        self.rows.append({"check": name, "result": "ok", "seconds": time.perf_counter() - started, "detail": detail})
        return result

    def __enter__(self) -> Checks:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and first_failed(self.rows) is None:  # failed between checks
            self.rows.append({"check": "(between checks)", "result": "FAILED", "seconds": 0.0,
                              "detail": f"{type(error).__name__}: {error}"[:300]})
        failed = first_failed(self.rows)
        if isinstance(error, Exception) and failed:
            error.args = (f"{failed}: {error}",)  # same type (callers tell failures apart by class), clearer line
        publish_checks(self.title, self.server, self.rows, self.figures, self.history_key)


def latest_table(key: str) -> list[dict]:
    """The rows of the newest table artifact under `key` (none yet: [])."""
    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])), limit=1)
    if not latest:
        return []
    data = latest[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    return rows if isinstance(rows, list) else []


@task(task_run_name="verify report")
def publish_checks(title: str, server: str, rows: list[dict], figures: dict[str, str], history_key: str) -> None:
    failed = first_failed(rows)
    passed = failed is None
    lines = [f"# {title}: {'passed' if passed else 'FAILED'}", "", f"Registry `{server}`", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['result']} | {r['seconds']:.2f} | {r['detail']} |" for r in rows]
    lines += ["", *(f"- {k}: {v}" for k, v in figures.items())]
    create_markdown_artifact(key=f"{history_key}-report", markdown="\n".join(lines) + "\n", description=title)
    run = context.flow_run if (context := FlowRunContext.get()) else None
    row = {"time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
           "run": f"{run.name} ({str(run.id)[:8]})" if run else "",
           "result": "passed" if passed else "FAILED", "failed check": failed or "", **figures}
    create_table_artifact(key=history_key, table=[row, *latest_table(history_key)][:HISTORY],
                          description=f"crflow verify of {server}: the last {HISTORY} runs, newest first")
