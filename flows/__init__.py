"""Prefect flows: thin wrappers that call `dualstpm.stages` as tasks."""
