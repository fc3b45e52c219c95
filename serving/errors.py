"""The one error type the gallery service raises: an HTTP status and a message for a person."""

from __future__ import annotations


class GalleryError(Exception):
    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail

    def __reduce__(self):  # picklable across processes
        return (GalleryError, (self.status_code, self.detail))


def bad_request(detail: str) -> GalleryError:
    return GalleryError(400, detail)


def forbidden(detail: str) -> GalleryError:
    return GalleryError(403, detail)


def not_found(detail: str) -> GalleryError:
    return GalleryError(404, detail)


def conflict(detail: str) -> GalleryError:
    return GalleryError(409, detail)
