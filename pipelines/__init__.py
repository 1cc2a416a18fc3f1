"""Dagster definitions: thin assets over ``distill`` and ``storage``."""
