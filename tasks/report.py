"""What does a person see in the Prefect UI after a run? A short markdown summary, with
addresses, fingerprints and dates, and never a secret."""

from __future__ import annotations

import datetime as dt

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.pki import KeyPair


def certificate_rows(ca: KeyPair, server_cert: KeyPair) -> list[tuple[str, str]]:
    now = dt.datetime.now(dt.timezone.utc)

    def expiry(pair: KeyPair) -> str:
        ends = pair.cert.not_valid_after_utc
        return f"{ends:%Y-%m-%d} ({(ends - now).days} days)"

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
