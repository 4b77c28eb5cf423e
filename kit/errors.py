"""Errors the kit raises on purpose. Their messages are written for the visitor or the owner."""

from __future__ import annotations


class KitError(Exception):
    """Base class for errors whose message is safe to show to a visitor."""


class InvalidRequest(KitError):
    """A job's parameters break the preset's rules. Raised before the job takes a GPU slot."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter
        self.message = message


class PresetError(KitError):
    """A preset file is missing, malformed or has a value outside what is allowed."""


class ModelUnavailable(KitError):
    """A model could not be loaded: not cached, not downloadable, or broken on disk."""


class JobCancelled(KitError):
    """A job was stopped by its visitor (Stop button, closed tab or client cancel)."""


class GenerationFailed(KitError):
    """A job ran but produced nothing that may be saved (for example an all-black image)."""


class GalleryError(KitError):
    """A gallery entry could not be found, read, written or deleted."""
