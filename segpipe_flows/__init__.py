"""Prefect flows: thin wiring of segpipe's stages into tasks (one task per stage of a scene)."""
