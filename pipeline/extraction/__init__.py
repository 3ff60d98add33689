"""Extraction: manifest rows -> one tar per clip (`msaflow extract`), crash-isolated worker processes."""
