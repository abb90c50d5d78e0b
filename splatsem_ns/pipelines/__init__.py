"""Pipelines: nerfstudio VanillaPipeline plus the semantic evaluation protocol."""
