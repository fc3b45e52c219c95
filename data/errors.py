"""Errors shared by the data layer."""

from __future__ import annotations


class DataUnavailableError(FileNotFoundError):
    """A dataset file or folder is missing; the message says how to get it or point elsewhere."""
