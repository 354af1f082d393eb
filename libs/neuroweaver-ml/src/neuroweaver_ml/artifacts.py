"""Artifact helpers: digests, ``file://`` URIs, path confinement, copying into a store.

A directory digest is sha256 over lines ``"<relative posix path>\\0<file sha256>\\n"`` of all
regular files, sorted by relative path, so it is independent of mtimes, of the directory's own
location and of the file-system order. Trainer and model server compute it the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import DigestMismatch, PathNotAllowed, PathUnusable
from .paths import CONTROL, UNCONFINED, URI_SCHEME, PathRoots, parse_path

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _iter_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file():
                out.append((p.relative_to(root).as_posix(), p))
    out.sort(key=lambda t: t[0])
    return out


def digest_path(path: str | os.PathLike) -> tuple[str, int]:
    """Return ``(sha256 hex, total size in bytes)`` of a file or a directory tree.

    For a file: the plain sha256 of its bytes. For a directory: see the module docstring.
    """
    p = Path(path)
    if p.is_file():
        return sha256_file(p), p.stat().st_size
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or directory: {p}")
    h = hashlib.sha256()
    size = 0
    for rel, fp in _iter_files(p):
        h.update(rel.encode() + b"\0" + sha256_file(fp).encode() + b"\n")
        size += fp.stat().st_size
    return h.hexdigest(), size


def verify_digest(path: str | os.PathLike, expected_sha256: str) -> tuple[str, int]:
    """Compute the digest and raise ``DigestMismatch`` if it differs from ``expected_sha256``."""
    actual, size = digest_path(path)
    exp = expected_sha256.lower().removeprefix("sha256:")
    if actual != exp:
        raise DigestMismatch(str(path), exp, actual)
    return actual, size


def path_to_uri(path: str | os.PathLike) -> str:
    """Absolute ``file://`` URI of a local path."""
    return Path(path).resolve().as_uri()


def uri_to_path(uri_or_path: str | os.PathLike) -> Path:
    """Local path of a ``file://`` URI or a plain path, parsed like every path input
    (:func:`neuroweaver_ml.paths.parse_path`); relative plain paths are returned as they are.
    Other schemes, NUL bytes, invalid UTF-8 → ``PathNotAllowed``."""
    s = os.fspath(uri_or_path)
    if isinstance(s, str) and s and not s.startswith("/") and not URI_SCHEME.match(s):
        if "\0" in s:
            raise PathNotAllowed(CONTROL)
        return Path(s)
    return Path(parse_path(s))


def confine_path(uri_or_path: str | os.PathLike, allowed_roots: list[str | os.PathLike] | PathRoots) -> Path:
    """Resolve a URI/path (``..`` and symlinks, never looking outside the roots) and return it only if it lies
    under one of ``allowed_roots``, existing or not; ``PathNotAllowed`` otherwise (see :mod:`neuroweaver_ml.paths`)."""
    roots = allowed_roots if isinstance(allowed_roots, PathRoots) else PathRoots(allowed_roots)
    try:
        return roots.resolve(uri_or_path, must_exist=False)
    except PathUnusable as exc:  # inside the roots but unreadable: refused all the same
        raise PathNotAllowed(exc.detail) from None


def store_artifact(src: str | os.PathLike, store_dir: str | os.PathLike, name: str) -> tuple[str, str, int]:
    """Copy a file or directory into ``store_dir/<name>`` atomically (copy to a temp sibling,
    then rename) and return ``(file:// uri, sha256, size_bytes)``.

    ``name`` may contain ``/`` (e.g. ``"adapters/job-1"``) but must stay inside the store.
    An existing destination with the same digest is reused; a different one raises ``FileExistsError``
    (artifacts are immutable: never reuse a name for new bytes).
    """
    src_p = Path(src)
    store = Path(store_dir).resolve()
    dest = confine_path(str(store / name), [store])
    if dest == store:
        raise PathNotAllowed("must name an artifact inside the store, not the store itself")
    digest, size = digest_path(src_p)
    if dest.exists():
        existing, _ = digest_path(dest)
        if existing == digest:
            return path_to_uri(dest), digest, size
        raise FileExistsError(f"artifact {dest} already exists with a different digest ({existing})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{uuid.uuid4().hex[:8]}.tmp", dir=dest.parent))
    try:
        if src_p.is_dir():
            staged = tmp / "d"
            shutil.copytree(src_p, staged)
        else:
            staged = tmp / "f"
            shutil.copy2(src_p, staged)
        try:
            os.rename(staged, dest)
        except OSError:
            if dest.exists() and digest_path(dest)[0] == digest:  # lost a race to an identical copy
                return path_to_uri(dest), digest, size
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path_to_uri(dest), digest, size


def fetch_artifact(
    uri: str, allowed_roots: list[str | os.PathLike] | PathRoots | None = None, expected_sha256: str | None = None
) -> Path:
    """Resolve an artifact URI to an existing local file or directory (confined to ``allowed_roots`` when given)
    and verify its digest when ``expected_sha256`` is given. ``PathNotAllowed`` / ``PathNotFound`` /
    ``PathUnusable`` as :meth:`PathRoots.resolve`; ``DigestMismatch``."""
    if allowed_roots is None:
        roots = UNCONFINED
    else:
        roots = allowed_roots if isinstance(allowed_roots, PathRoots) else PathRoots(allowed_roots)
    p = roots.resolve(uri)
    if expected_sha256:
        verify_digest(p, expected_sha256)
    return p
