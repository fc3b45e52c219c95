"""Evaluation utilities for Smart Gallery (retrieval metrics)."""
