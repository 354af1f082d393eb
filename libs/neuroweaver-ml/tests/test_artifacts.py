import os

import pytest

from neuroweaver_ml.artifacts import (
    confine_path,
    digest_path,
    fetch_artifact,
    path_to_uri,
    sha256_file,
    store_artifact,
    uri_to_path,
)
from neuroweaver_ml.errors import DigestMismatch, PathNotAllowed


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01beta")
    return root


def test_file_digest_is_plain_sha256(tmp_path):
    import hashlib

    f = tmp_path / "x"
    f.write_bytes(b"hello")
    assert digest_path(f) == (hashlib.sha256(b"hello").hexdigest(), 5)
    assert sha256_file(f) == hashlib.sha256(b"hello").hexdigest()


def test_dir_digest_is_location_independent_and_content_sensitive(tmp_path):
    d1 = _tree(tmp_path / "one")
    d2 = _tree(tmp_path / "two")
    s1, n1 = digest_path(d1)
    assert (s1, n1) == digest_path(d2)
    assert n1 == 5 + 6
    (d2 / "sub" / "b.bin").write_bytes(b"\x00\x01betA")
    assert digest_path(d2)[0] != s1
    os.rename(d2 / "sub" / "b.bin", d2 / "sub" / "c.bin")
    (d2 / "sub" / "c.bin").write_bytes(b"\x00\x01beta")
    assert digest_path(d2)[0] != s1  # same bytes under another name is another artifact


def test_digest_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        digest_path(tmp_path / "nope")


def test_uri_roundtrip_and_schemes(tmp_path):
    uri = path_to_uri(tmp_path / "a b")
    assert uri.startswith("file://") and "%20" in uri
    assert uri_to_path(uri) == (tmp_path / "a b").resolve()
    with pytest.raises(PathNotAllowed, match="scheme"):
        uri_to_path("s3://bucket/key")
    with pytest.raises(PathNotAllowed, match="host"):
        uri_to_path("file://evil.example/etc/passwd")


def test_confine_path(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert confine_path(str(root / "ok"), [root]) == (root / "ok").resolve()
    assert confine_path(path_to_uri(root / "ok"), [root]) == (root / "ok").resolve()
    with pytest.raises(PathNotAllowed, match="outside the directories"):
        confine_path(str(root / ".." / "outside"), [root])
    (root / "link").symlink_to(outside)
    with pytest.raises(PathNotAllowed):
        confine_path(str(root / "link"), [root])
    with pytest.raises(PathNotAllowed, match="absolute"):
        confine_path("relative/path", [root])
    # a sibling whose name merely starts with the root's name is not inside it
    (tmp_path / "root2").mkdir()
    with pytest.raises(PathNotAllowed):
        confine_path(str(tmp_path / "root2"), [root])


def test_store_and_fetch_artifact(tmp_path):
    src = _tree(tmp_path / "adapter")
    store = tmp_path / "store"
    uri, sha, size = store_artifact(src, store, "adapters/job-1")
    assert uri == path_to_uri(store / "adapters" / "job-1")
    assert (sha, size) == digest_path(src)
    assert store_artifact(src, store, "adapters/job-1") == (uri, sha, size)  # idempotent
    (src / "a.txt").write_bytes(b"changed")
    with pytest.raises(FileExistsError):
        store_artifact(src, store, "adapters/job-1")
    with pytest.raises(PathNotAllowed):
        store_artifact(src, store, "../escape")
    assert not [p for p in (store / "adapters").iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert fetch_artifact(uri, [store], expected_sha256=sha) == (store / "adapters" / "job-1").resolve()
    with pytest.raises(DigestMismatch):
        fetch_artifact(uri, [store], expected_sha256="0" * 64)
    with pytest.raises(PathNotAllowed):
        fetch_artifact(uri, [tmp_path / "elsewhere"])
