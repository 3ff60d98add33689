"""The clip manifest: one normalized table, one row per clip (docs/data-contracts.md §1)."""

from __future__ import annotations

import re

MANIFEST_COLUMNS = ["id", "video_id", "clip_id", "path", "start", "end", "text", "label", "split",
                    "label_T", "label_A", "label_V"]
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(clip_id: str) -> str:
    """WebDataset key of a clip: every character outside [A-Za-z0-9_-] becomes `_`."""
    return _KEY_UNSAFE.sub("_", clip_id)
