"""The pipeline's steps as plain Python: one module per step, each with a typed config and a CLI."""
