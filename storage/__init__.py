"""Soft-label shard store: schema, crash-safe writer, verifying streaming reader, cache keys.

Knows nothing of models or Dagster.
"""
