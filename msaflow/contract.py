"""The names the batch contract is written in (docs/data-contracts.md), defined once for every layer."""

from __future__ import annotations

SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "audio", "vision")  # in this order wherever modalities are listed
SEQUENCE_MODALITIES = ("audio", "vision")  # time series of feature rows; text is token ids
# `text_ids` are uncased BERT WordPiece ids (the tokenizer of every shipped text encoder);
# a missing token is replaced by [UNK]
UNK_ID = 100
