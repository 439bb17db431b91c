"""A reference to a signed manifest: the file, the dataset it must be, its shards' folder and its trust.

Kept apart from the readers (no torch here), so a cycle config parses into the same type the API takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from trainguard.provenance.errors import MalformedError


@dataclass(frozen=True)
class ManifestRef:
    """A signed manifest, the dataset it must be, the folder of its shards (default: the manifest's) and its trust
    policy or key (default: the caller's). The one manifest reference: the API takes it, and a cycle config's
    `dataset.training` and `dataset.holdout` entries are parsed into it (unknown keys refused).

    Attributes:
        manifest: The signed manifest file.
        data_dir: The folder its shard names are relative to; None: the manifest's folder.
        trust: Its trust policy file or `.pub` key; None: the one the caller passes (`trust=`).
        dataset: The dataset name the manifest must carry (WrongDatasetError otherwise); None: any name.
    """

    manifest: Path
    data_dir: Path | None = None
    trust: Path | None = None
    dataset: str | None = None

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}  # read by pydantic in a config section


ManifestLike = ManifestRef | Path | str | Mapping[str, str]


def as_ref(item: ManifestLike) -> ManifestRef:
    """A manifest reference from a path or a mapping with `manifest` (and optional dataset, data_dir, trust)."""
    if isinstance(item, ManifestRef):
        return item
    if isinstance(item, Mapping):
        unknown = set(item) - {"manifest", "data_dir", "trust", "dataset"}
        if "manifest" not in item or unknown:
            raise MalformedError(
                f"a manifest entry needs 'manifest' (and optional dataset, data_dir, trust); got {dict(item)}"
            )
        return ManifestRef(
            Path(item["manifest"]),
            Path(item["data_dir"]) if item.get("data_dir") else None,
            Path(item["trust"]) if item.get("trust") else None,
            item.get("dataset") or None,
        )
    return ManifestRef(Path(item))
