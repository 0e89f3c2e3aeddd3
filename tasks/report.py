"""What does a person see in the Prefect UI after a run? A short markdown summary, with
addresses, fingerprints and dates, and never a secret."""

from __future__ import annotations

import datetime as dt
import time

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

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


@task
def publish_summary(key: str, title: str, rows: list[tuple[str, str]]) -> None:
    """A markdown artifact under `key`, so the UI shows the latest one of each kind."""
    create_markdown_artifact(key=key, markdown=markdown_table(title, rows), description=title)


class Checks:
    """Runs checks in order, timing each, and publishes what happened when the block ends,
    passed or failed: a markdown artifact, and a row of the `crflow-verify` table."""

    def __init__(self, title: str, server: str):
        self.title, self.server = title, server
        self.rows: list[dict] = []
        self.figures: dict[str, str] = {}

    def check(self, name: str, fn, *args):
        started = time.perf_counter()
        try:
            result = fn(*args)
        except BaseException as err:
            self.rows.append({"check": name, "result": "FAILED", "seconds": time.perf_counter() - started,
                              "detail": str(err)[:300]})
            raise
        detail = result if isinstance(result, str) else ""
        self.rows.append({"check": name, "result": "ok", "seconds": time.perf_counter() - started, "detail": detail})
        return result

    def __enter__(self) -> Checks:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and all(r["result"] == "ok" for r in self.rows):  # failed between checks
            self.rows.append({"check": "(between checks)", "result": "FAILED", "seconds": 0.0,
                              "detail": f"{type(error).__name__}: {error}"[:300]})
        publish_checks(self.title, self.server, self.rows, self.figures)


@task
def publish_checks(title: str, server: str, rows: list[dict], figures: dict[str, str]) -> None:
    passed = all(r["result"] == "ok" for r in rows)
    lines = [f"# {title}: {'passed' if passed else 'FAILED'}", "", f"Registry `{server}`", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['result']} | {r['seconds']:.2f} | {r['detail']} |" for r in rows]
    lines += ["", *(f"- {k}: {v}" for k, v in figures.items())]
    create_markdown_artifact(key="crflow-verify-report", markdown="\n".join(lines) + "\n", description=title)
    failed = next((r["check"] for r in rows if r["result"] != "ok"), "")
    create_table_artifact(key="crflow-verify", description="crflow verify-push-pull, one row a run", table=[{
        "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"), "result": "passed" if passed else "FAILED",
        "failed check": failed, **figures}])
