"""Prefect flows: thin wrappers that call `dualstpm.mlops.stages` as tasks."""
