"""The MLOps side: MLflow tracking, lineage, the registry and the pipeline's stages.

Nothing is re-exported here: import each module by its own name, so a command pays only
for what it uses.
"""
