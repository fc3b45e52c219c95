"""Which paths the server may read: the allowed-roots policy.

Every path a request names is made absolute and resolved (symlinks and `..` followed) before
it is checked, so neither can lead outside an allowed root. A path outside the roots is a 403
whether or not it exists, so the answer does not reveal what exists elsewhere.

With no roots configured (only allowed on a loopback bind, see `ServeSettings.validate`) the
server may read any path its process can read: the original behaviour of the API.
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.errors import GalleryError, bad_request, forbidden


class PathPolicy:
    def __init__(self, allowed_roots: list[str] | tuple[str, ...] = ()):
        self.roots = tuple(Path(root).expanduser().resolve() for root in allowed_roots)

    @property
    def restricted(self) -> bool:
        return bool(self.roots)

    def allows(self, resolved: Path) -> bool:
        return not self.roots or any(resolved == root or resolved.is_relative_to(root) for root in self.roots)

    def resolve(self, raw: str, what: str = "path") -> Path:
        """The resolved form of a path from a request; 400 if malformed, 403 if outside the roots."""
        if not isinstance(raw, str) or not raw.strip():
            raise bad_request(f"{what} is empty")
        if "\x00" in raw:
            raise bad_request(f"{what} contains a NUL byte")
        path = Path(raw)
        if not path.is_absolute():
            raise bad_request(f"{what} must be an absolute path on the server, got {raw!r}")
        try:
            resolved = path.resolve()
            os.fsencode(resolved)
        except (OSError, RuntimeError, ValueError) as error:  # symlink loop, name too long, lone surrogate...
            raise bad_request(f"{what} cannot be resolved: {raw!r}: {error}") from None
        self.check(resolved, raw)
        return resolved

    def check(self, resolved: Path, shown: str | Path | None = None) -> None:
        if not self.allows(resolved):
            raise forbidden(
                f"{shown or resolved} is outside the folders this server may read "
                f"(allowed roots: {', '.join(map(str, self.roots))})"
            )

    def check_file(self, path: Path) -> Path | GalleryError:
        """For a file met while walking a folder: its resolved path, or the reason it is refused."""
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as error:
            return bad_request(f"cannot resolve {path}: {error}")
        if not self.allows(resolved):
            return forbidden(f"{path} resolves to {resolved}, outside the allowed roots")
        return resolved


def ancestors(path: str) -> list[str]:
    """Every folder above `path`, root first: '/a/b/c.jpg' -> ['/', '/a', '/a/b']."""
    parents = [str(parent) for parent in Path(path).parents]
    return list(reversed(parents)) if parents else [os.sep]
