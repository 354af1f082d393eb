"""The one resolver for every path-like input: datasets, base models, adapters, artifacts.

``PathRoots(dirs).resolve(uri_or_path)`` accepts an absolute path or a ``file://`` URI and returns its real
path only if it lies inside one of the roots. It resolves ``..`` and symlinks itself, one component at a
time, and never touches the filesystem outside the roots:

* the roots are resolved once (``realpath``), so the directories above a root are real directories and are
  walked without a system call;
* a component that leaves the roots (a name beside a root, ``..`` above it, a symlink whose target points
  elsewhere) is refused at once, before anything there is looked at;
* inside a root each component is ``lstat``-ed; a symlink's target is walked the same way.

So a path outside the roots gets the same ``PathNotAllowed`` whether it exists or not (no existence oracle),
and no error carries a server path, a root, a symlink target or the input: every message is one of a
few fixed sentences. Inside the roots, "does not exist" (``PathNotFound``) and "wrong kind" / "unreadable"
(``PathUnusable``) are told apart. Nothing raises ``OSError``/``ValueError``: NUL and control characters,
non-UTF-8 (percent-encoded or surrogate-escaped), over-long paths, ``/proc`` magic links, device files and
FIFOs all end in one of these errors.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import unquote_to_bytes, urlsplit

from .errors import PathNotAllowed, PathNotFound, PathUnusable

MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX
MAX_SYMLINKS = 40  # as the kernel (ELOOP)
_MAX_INPUT_CHARS = 3 * MAX_PATH_BYTES  # a percent-encoded URI of a PATH_MAX path

NOT_ABSOLUTE = "must be an absolute path or a file:// URI"
BAD_SCHEME = "must be an absolute path or a file:// URI (no other URI scheme is read from local disk)"
REMOTE_HOST = "must not name a host in its file:// URI"
QUERY = "must not have a query or fragment in its file:// URI (percent-encode ? and #)"
NOT_UTF8 = "is not valid UTF-8"
CONTROL = "contains a NUL or control character"
TOO_LONG = f"is longer than {MAX_PATH_BYTES} bytes or has a component longer than {MAX_NAME_BYTES} bytes"
OUTSIDE = "is outside the directories this server may read"
NOT_FOUND = "does not exist"
NOT_A_FILE = "is not a regular file"
NOT_A_DIR = "is not a directory"
NOT_FILE_OR_DIR = "is neither a regular file nor a directory"
UNREADABLE = "cannot be read"
LOOP = "has too many levels of symbolic links"

URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Kind = Literal["any", "file", "dir"]


def _parts(path: str) -> tuple[str, ...]:
    return tuple(c for c in path.split("/") if c and c != ".")


def parse_path(uri_or_path: str | bytes | os.PathLike) -> str:
    """The absolute local path named by a plain path or a ``file://`` URI (percent-decoded), checked for
    everything that can be judged without the filesystem. Raises ``PathNotAllowed``."""
    s = os.fspath(uri_or_path)
    if isinstance(s, bytes):
        try:
            s = s.decode("utf-8")
        except UnicodeDecodeError:
            raise PathNotAllowed(NOT_UTF8) from None
    if len(s) > _MAX_INPUT_CHARS:
        raise PathNotAllowed(TOO_LONG)
    if s.startswith("/"):
        path = s
    elif URI_SCHEME.match(s):
        if s.split(":", 1)[0].lower() != "file":
            raise PathNotAllowed(BAD_SCHEME)
        if "?" in s or "#" in s:
            raise PathNotAllowed(QUERY)
        u = urlsplit(s)
        if u.netloc not in ("", "localhost"):
            raise PathNotAllowed(REMOTE_HOST)
        try:
            path = unquote_to_bytes(u.path).decode("utf-8")
        except UnicodeDecodeError:
            raise PathNotAllowed(NOT_UTF8) from None
        if not path.startswith("/"):
            raise PathNotAllowed(NOT_ABSOLUTE)
    else:
        raise PathNotAllowed(NOT_ABSOLUTE)
    if _CONTROL.search(path):
        raise PathNotAllowed(CONTROL)
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (surrogate-escaped bytes)
        raise PathNotAllowed(NOT_UTF8) from None
    if len(encoded) > MAX_PATH_BYTES or any(len(c.encode()) > MAX_NAME_BYTES for c in _parts(path)):
        raise PathNotAllowed(TOO_LONG)
    return path


class PathRoots:
    """Directories that path inputs must stay inside (server configuration, trusted).

    A root is kept as its real path; the spelling it was configured with (``/data/link/x`` when
    ``/data/link`` is a symlink) is accepted as a prefix of inputs too. A root that does not exist yet
    is fine (it confines to nothing until it is created)."""

    def __init__(self, roots: Iterable[str | os.PathLike]) -> None:
        real: list[tuple[str, ...]] = []
        aliases: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        for root in roots:
            spelled = os.path.abspath(os.path.expanduser(os.fspath(root)))
            rp, sp = _parts(os.path.realpath(spelled)), _parts(spelled)
            if rp not in real:
                real.append(rp)
            if sp != rp:
                aliases.append((sp, rp))
        self._roots = tuple(real)
        self._aliases = tuple(aliases)

    @classmethod
    def parse(cls, setting: str, default: Iterable[str | os.PathLike] = ()) -> PathRoots:
        """Comma-separated directories; ``default`` when the setting is empty."""
        roots = [r.strip() for r in setting.split(",") if r.strip()] if setting else list(default)
        return cls(roots)

    @property
    def paths(self) -> list[Path]:
        """The roots' real paths (for configuration output and tests; never put them in an API error)."""
        return [Path("/" + "/".join(r)) for r in self._roots]

    def __bool__(self) -> bool:
        return bool(self._roots)

    def __repr__(self) -> str:
        return f"PathRoots({[str(p) for p in self.paths]!r})"

    def _inside(self, parts: tuple[str, ...]) -> bool:
        return any(parts[: len(r)] == r for r in self._roots)

    def _above(self, parts: tuple[str, ...]) -> bool:
        """A proper ancestor of some root: a real directory, walked without looking at it."""
        return any(len(parts) < len(r) and r[: len(parts)] == parts for r in self._roots)

    def _unalias(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        for spelled, real in self._aliases:
            if parts[: len(spelled)] == spelled:
                return real + parts[len(spelled) :]
        return parts

    def _walk(self, parts: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
        """Real path of an absolute path (as components) and whether it exists; ``PathNotAllowed`` as soon
        as a step leaves the roots."""
        pending = list(reversed(self._unalias(parts)))
        cur: tuple[str, ...] = ()
        exists, hops = True, 0
        while pending:
            name = pending.pop()
            if name == "..":
                cur = cur[:-1]  # the parent of a real path is real; inside a root or above one, never beside
                continue
            step = (*cur, name)
            if not self._inside(step):
                if self._above(step):
                    cur = step
                    continue
                raise PathNotAllowed(OUTSIDE)
            if not exists:  # under a missing component nothing exists; keep walking by name
                cur = step
                continue
            full = "/" + "/".join(step)
            try:
                st = os.lstat(full)
            except (FileNotFoundError, NotADirectoryError):
                exists, cur = False, step
                continue
            except OSError:
                raise PathUnusable(UNREADABLE) from None
            if not stat.S_ISLNK(st.st_mode):
                cur = step
                continue
            hops += 1
            if hops > MAX_SYMLINKS:
                raise PathUnusable(LOOP)
            try:
                target = os.readlink(full)
            except OSError:  # e.g. /proc/<pid>/root of another user's process
                raise PathUnusable(UNREADABLE) from None
            if target.startswith("/"):
                cur, target_parts = (), self._unalias(_parts(target))
            else:
                target_parts = _parts(target)
            pending.extend(reversed(target_parts))
        if not self._inside(cur):  # e.g. a directory above every root
            raise PathNotAllowed(OUTSIDE)
        return cur, exists

    def resolve(self, uri_or_path: str | bytes | os.PathLike, *, kind: Kind = "any", must_exist: bool = True) -> Path:
        """Real path of ``uri_or_path`` inside the roots.

        ``kind``: ``file`` needs a regular file, ``dir`` a directory, ``any`` either (never a device, FIFO or
        socket). With ``must_exist=False`` a missing path is returned (the kind is checked only if it exists).
        Raises ``PathNotAllowed`` (outside, or refused by :func:`parse_path`), ``PathNotFound`` or ``PathUnusable``.
        """
        parts, exists = self._walk(_parts(parse_path(uri_or_path)))
        path = "/" + "/".join(parts)
        if not exists:
            if must_exist:
                raise PathNotFound(NOT_FOUND)
            return Path(path)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:  # removed while we looked
            if must_exist:
                raise PathNotFound(NOT_FOUND) from None
            return Path(path)
        except OSError:
            raise PathUnusable(UNREADABLE) from None
        if kind == "file" and not stat.S_ISREG(mode):
            raise PathUnusable(NOT_A_FILE)
        if kind == "dir" and not stat.S_ISDIR(mode):
            raise PathUnusable(NOT_A_DIR)
        if kind == "any" and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise PathUnusable(NOT_FILE_OR_DIR)
        return Path(path)

    def contains(self, uri_or_path: str | bytes | os.PathLike) -> bool:
        """True if the path resolves inside the roots (existing or not)."""
        try:
            self.resolve(uri_or_path, must_exist=False)
        except PathNotAllowed:
            return False
        except (PathNotFound, PathUnusable):
            return True
        return True


# Trusted callers (a CLI argument, the model server's own flags) resolve through the same code with "/" as
# the only root: the same parsing and errors, no confinement.
UNCONFINED = PathRoots(["/"])
