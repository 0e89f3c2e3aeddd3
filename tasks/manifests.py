"""What would an upgrade change? Two sets of manifests compared object by object, as a
person reads a diff: Secret data redacted, multi-line strings (config.yml) line by line."""

from __future__ import annotations

import difflib
import json

import yaml

REDACTED = "(redacted)"


def _comparable(obj: dict) -> dict:
    """An object as the chart defines it: Secret values redacted, the namespace left out."""
    obj = json.loads(json.dumps(obj))
    if obj.get("kind") == "Secret":
        for field in ("data", "stringData"):
            obj[field] = dict.fromkeys(obj.get(field) or {}, REDACTED)
    obj.get("metadata", {}).pop("namespace", None)
    return obj


class _BlockDumper(yaml.SafeDumper):
    """YAML with multi-line strings (a ConfigMap's config.yml) as blocks, so a diff shows their lines."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def diff_manifests(deployed: list[dict], rendered: list[dict]) -> dict[str, str]:
    """For each object (kind/name) the two sets of manifests define differently, its unified
    diff, Secret data redacted; {} if they define the same objects."""
    def by_key(objects: list[dict]) -> dict[str, str]:
        return {f"{o['kind']}/{o['metadata']['name']}": yaml.dump(_comparable(o), Dumper=_BlockDumper, sort_keys=True)
                for o in objects}

    old, new = by_key(deployed), by_key(rendered)
    return {key: "\n".join(difflib.unified_diff((old.get(key) or "").splitlines(), (new.get(key) or "").splitlines(),
                                                f"deployed/{key}", f"upgrade/{key}", lineterm="", n=2))
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}
