"""What a step did, as values callers compare (never prose they parse)."""

from __future__ import annotations

import enum


class Change(enum.StrEnum):
    """What writing a Kubernetes object did (a StrEnum: logs and Prefect's results show the word)."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
