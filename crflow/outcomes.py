"""What a step did, as values callers compare (never prose they parse)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Change(enum.StrEnum):
    """What writing a Kubernetes object did (a StrEnum: logs and Prefect's results show the word)."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class Launch(enum.StrEnum):
    """What making the local registry process match its pod did."""

    STARTED = "started"
    RESTARTED = "restarted"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class PodApplied:
    """The local pod applied: what happened to its process, and for a restart, how long
    connections were refused (one process per port: between the old one's stop and the new
    one's listen)."""

    launch: Launch
    refused_seconds: float | None = None

    def __str__(self) -> str:
        if self.launch is Launch.RESTARTED:
            return f"restarted; refused connections for {self.refused_seconds:.2f} s"
        return str(self.launch)
