"""Dagster definitions: thin wrappers that call :mod:`ese_assets.pipeline` and report metadata."""
