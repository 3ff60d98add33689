"""The dataset formats `msaflow manifest` reads: a registry of name -> adapter class.

An adapter (`msaflow.datasets.base.DatasetAdapter`) has `name`, `detect(root, cfg) -> bool`
and `read(root, cfg, problems) -> list[ClipRecord]`. `--format auto` takes the first adapter,
in registry order, whose `detect` accepts the dataset; `folder` accepts anything, so it is last.
"""

from __future__ import annotations

from pathlib import Path

from msaflow.datasets.base import DatasetAdapter, ReadOptions
from msaflow.datasets.folder import FolderAdapter
from msaflow.datasets.mmsa_raw import MmsaRawAdapter
from msaflow.datasets.segments import SegmentsAdapter

ADAPTERS: dict[str, type[DatasetAdapter]] = {
    MmsaRawAdapter.name: MmsaRawAdapter,
    SegmentsAdapter.name: SegmentsAdapter,
    FolderAdapter.name: FolderAdapter,
}


def select_adapter(root: Path, cfg: ReadOptions) -> DatasetAdapter:
    """The adapter named by `cfg.format`, or for `auto` the first that recognises the dataset."""
    if cfg.format != "auto":
        return ADAPTERS[cfg.format]()
    return next(adapter for adapter in (cls() for cls in ADAPTERS.values()) if adapter.detect(root, cfg))
