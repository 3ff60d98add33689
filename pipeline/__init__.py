"""Orchestration: CLI, config models, manifest, extraction, shards, training, evaluation, reports."""
