"""Fusion of SLIM rationale vectors with ID-based and distilled LLM recommenders, and the pipeline."""
