"""The one path resolver: confinement after `..` and symlinks, no existence oracle, no filesystem access outside
the roots, no server path in any error, and no OSError/ValueError for hostile input."""

from __future__ import annotations

import os

import pytest

from neuroweaver_ml import paths as paths_mod
from neuroweaver_ml.errors import ModelNotFound, PathError, PathNotAllowed, PathNotFound, PathUnusable
from neuroweaver_ml.models import build_tiny_llama, reference_kind, resolve_base_model
from neuroweaver_ml.paths import UNCONFINED, PathRoots, parse_path


@pytest.fixture
def tree(tmp_path):
    """root/{f.txt, sub/, rel -> ../root/sub, back -> <abs root>/f.txt, esc -> outside/, esc-missing -> /nope/x,
    loop1 <-> loop2, fifo}; outside/secret.txt beside the root."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "f.txt").write_text("inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "rel").symlink_to("../root/sub")
    (root / "back").symlink_to(root / "f.txt")
    (root / "esc").symlink_to(outside)
    (root / "esc-file").symlink_to(outside / "secret.txt")
    (root / "esc-missing").symlink_to(tmp_path / "nope" / "x")
    (root / "up").symlink_to("../..")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    os.mkfifo(root / "fifo")
    return root, outside, tmp_path


def _refusal(roots: PathRoots, value, **kw) -> PathError:
    with pytest.raises(PathError) as err:
        roots.resolve(value, **kw)
    return err.value


def test_inside_paths_and_uris_resolve_to_their_real_path(tree):
    root, _, _ = tree
    roots = PathRoots([root])
    assert roots.resolve(str(root / "f.txt"), kind="file") == root / "f.txt"
    assert roots.resolve((root / "f.txt").as_uri()) == root / "f.txt"
    assert roots.resolve(f"file://localhost{root}/f.txt") == root / "f.txt"
    assert roots.resolve(f"FILE://{root}/sub/../f.txt") == root / "f.txt"
    assert roots.resolve(f"{root}/rel", kind="dir") == root / "sub"  # relative symlink that leaves and re-enters
    assert roots.resolve(f"{root}/back") == root / "f.txt"
    assert roots.resolve(f"{root}/../root/./sub//") == root / "sub"
    assert roots.resolve(str(root)) == root
    (root / "a b").write_text("x")
    assert roots.resolve((root / "a b").as_uri()) == root / "a b"  # percent-decoded


@pytest.mark.parametrize(
    "value",
    [
        "{out}/secret.txt",
        "{out}/missing.txt",
        "file://{out}/secret.txt",
        "{root}/../outside/secret.txt",
        "{root}/../outside/missing.txt",
        "{root}/../../../../../../etc/passwd",
        "{root}/esc/secret.txt",
        "{root}/esc/missing.txt",
        "{root}/esc-file",
        "{root}/esc-missing",
        "{root}/up/outside/secret.txt",
        "{root}/missing/../../outside/secret.txt",
        "{root}2",
        "{tmp}",
        "/",
        "/etc",
        "/etc/passwd",
        "/etc/does-not-exist",
        "/root",
        "file:///etc/passwd",
        "/proc/1/root",
        "/proc/self/root/etc/passwd",
        "/dev/zero",
    ],
)
def test_outside_is_refused_with_one_message_that_names_nothing(tree, value):
    root, out, tmp = tree
    value = value.format(root=root, out=out, tmp=tmp)
    err = _refusal(PathRoots([root]), value)
    assert type(err) is PathNotAllowed and err.reason == "PATH_NOT_ALLOWED"
    assert str(err) == "path is outside the directories this server may read"
    assert str(tmp) not in str(err) and "secret" not in str(err)


def test_existing_and_missing_outside_paths_are_indistinguishable(tree):
    root, out, tmp = tree
    roots = PathRoots([root])
    pairs = [
        (str(out / "secret.txt"), str(out / "missing.txt")),
        ("/etc/passwd", "/etc/passwd-not-here"),
        ("/root", "/no-such-dir"),
        (str(root / "esc-file"), str(root / "esc-missing")),
    ]
    for existing, missing in pairs:
        a, b = _refusal(roots, existing), _refusal(roots, missing)
        assert (type(a), str(a), a.detail) == (type(b), str(b), b.detail), (existing, missing)


def test_nothing_outside_the_roots_is_looked_at(tree, monkeypatch):
    root, out, tmp = tree
    roots = PathRoots([root])  # configuration resolves the roots themselves once
    seen: list[str] = []
    for name in ("lstat", "stat", "readlink", "listdir", "scandir"):
        real = getattr(os, name)

        def spy(path, *a, _real=real, **kw):
            seen.append(os.fspath(path))
            return _real(path, *a, **kw)

        monkeypatch.setattr(paths_mod.os, name, spy)
    for value in (
        f"{out}/secret.txt",
        f"{root}/../outside/secret.txt",
        f"{root}/esc/secret.txt",
        f"{root}/esc-missing",
        f"{root}/up/outside",
        "/etc/passwd",
        "/proc/1/root",
        f"{root}/missing/../../outside",
    ):
        with pytest.raises(PathNotAllowed):
            roots.resolve(value)
    assert seen, "symlinks inside the root are read"
    outside_seen = [p for p in seen if not (p == str(root) or p.startswith(str(root) + "/"))]
    assert outside_seen == []


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("relative/path", paths_mod.NOT_ABSOLUTE),
        ("./f.txt", paths_mod.NOT_ABSOLUTE),
        ("~/f.txt", paths_mod.NOT_ABSOLUTE),
        ("", paths_mod.NOT_ABSOLUTE),
        ("file:relative", paths_mod.NOT_ABSOLUTE),
        ("s3://bucket/key", paths_mod.BAD_SCHEME),
        ("http://example.com/x", paths_mod.BAD_SCHEME),
        ("file://evil.example/etc/passwd", paths_mod.REMOTE_HOST),
        ("file:///x?y=1", paths_mod.QUERY),
        ("file:///x#frag", paths_mod.QUERY),
        ("/x\x00y", paths_mod.CONTROL),
        ("file:///x%00y", paths_mod.CONTROL),
        ("/x\ny", paths_mod.CONTROL),
        ("file:///x%FFy", paths_mod.NOT_UTF8),
        ("/x\udcffy", paths_mod.NOT_UTF8),
        (b"/x\xffy", paths_mod.NOT_UTF8),
        ("/" + "a" * 256, paths_mod.TOO_LONG),
        ("/a" * 2100, paths_mod.TOO_LONG),
        ("file:///" + "%41" * 5000, paths_mod.TOO_LONG),
    ],
)
def test_hostile_inputs_are_refused_before_any_lookup(tree, value, detail, monkeypatch):
    root, _, _ = tree
    roots = PathRoots([root])
    monkeypatch.chdir(root)  # the working directory is never used to resolve anything
    monkeypatch.setattr(paths_mod.os, "lstat", lambda *a: pytest.fail("looked at the filesystem"))
    err = _refusal(roots, value)
    assert type(err) is PathNotAllowed and err.detail == detail
    assert str(root) not in str(err)


def test_inside_problems_are_told_apart(tree):
    root, _, _ = tree
    roots = PathRoots([root])
    assert type(_refusal(roots, f"{root}/missing.txt")) is PathNotFound
    assert type(_refusal(roots, f"{root}/f.txt/child")) is PathNotFound  # a file used as a directory
    assert roots.resolve(f"{root}/missing.txt", must_exist=False) == root / "missing.txt"
    loop = _refusal(roots, f"{root}/loop1")
    assert type(loop) is PathUnusable and loop.reason == "PATH_UNUSABLE" and loop.detail == paths_mod.LOOP
    assert _refusal(roots, f"{root}/fifo").detail == paths_mod.NOT_FILE_OR_DIR  # never opened
    assert _refusal(roots, f"{root}/fifo", kind="file").detail == paths_mod.NOT_A_FILE
    assert _refusal(roots, f"{root}/sub", kind="file").detail == paths_mod.NOT_A_FILE
    assert _refusal(roots, f"{root}/f.txt", kind="dir").detail == paths_mod.NOT_A_DIR
    for value in (f"{root}/missing.txt", f"{root}/loop1", f"{root}/fifo"):
        assert str(root) not in str(_refusal(roots, value))


def test_unreadable_and_device_paths_are_path_errors_not_oserrors():
    for value in ("/proc/1/root", "/proc/1/root/etc/passwd", "/dev/null", "/dev/zero"):
        with pytest.raises(PathError):
            UNCONFINED.resolve(value, kind="file")
    assert UNCONFINED.resolve("/proc/self/cwd", kind="dir") == UNCONFINED.resolve(os.getcwd())


def test_root_spelled_through_a_symlink(tree, tmp_path):
    root, _, _ = tree
    (tmp_path / "alias").symlink_to(root)
    roots = PathRoots([tmp_path / "alias"])
    assert roots.paths == [root]
    assert roots.resolve(f"{tmp_path}/alias/f.txt") == root / "f.txt"
    assert roots.resolve(f"{root}/f.txt") == root / "f.txt"
    with pytest.raises(PathNotAllowed):
        roots.resolve(f"{tmp_path}/alias/../outside/secret.txt")


def test_parse_roots_setting_and_missing_roots(tmp_path):
    roots = PathRoots.parse(f" {tmp_path}/a , {tmp_path}/b ,", default=["/unused"])
    assert roots.paths == [tmp_path / "a", tmp_path / "b"]
    assert PathRoots.parse("", default=[tmp_path]).paths == [tmp_path]
    assert roots.resolve(f"{tmp_path}/a/x", must_exist=False) == tmp_path / "a" / "x"  # a root created later
    assert not PathRoots([])
    with pytest.raises(PathNotAllowed):
        PathRoots([]).resolve(str(tmp_path))


def test_parse_path():
    assert parse_path("file:///a%20b/c") == "/a b/c"
    assert parse_path("/a/../b") == "/a/../b"  # resolution is the roots' job


# -- base models through the resolver ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_llama(root / "tiny")
    (root / "empty").mkdir()
    (root / "file").write_text("x")
    (root / "link").symlink_to(root / "tiny")
    leaky = root / "leaky"
    leaky.mkdir()
    for f in (root / "tiny").iterdir():
        (leaky / f.name).symlink_to(f)
    (leaky / "config.json").unlink()
    (leaky / "config.json").symlink_to("/etc/passwd")
    return root


def test_reference_kinds():
    assert reference_kind("builtin:smollm2-135m-instruct") == "builtin"
    assert [reference_kind(r) for r in ("gpt2", "org/name", "HuggingFaceTB/SmolLM2-135M")] == ["hub"] * 3
    for ref in ("/abs", "file:///abs", "./rel", "~/x", "a/b/c", "../x", "a/..", "", "x y"):
        assert reference_kind(ref) == "path", ref


def test_base_model_paths_are_confined(model_root, tmp_path, monkeypatch):
    roots = PathRoots([model_root])
    assert resolve_base_model(str(model_root / "tiny"), roots=roots) == model_root / "tiny"
    assert resolve_base_model((model_root / "link").as_uri(), roots=roots) == model_root / "tiny"
    for ref in ("/etc", "/root", "file:///etc/passwd", "/proc/1/root", "./tiny", "~/tiny", str(tmp_path), "/x\x00"):
        with pytest.raises(PathNotAllowed):
            resolve_base_model(ref, roots=roots)
    with pytest.raises(PathNotAllowed):  # a checkpoint whose config.json links out of the roots
        resolve_base_model(str(model_root / "leaky"), roots=roots)
    with pytest.raises(ModelNotFound) as err:
        resolve_base_model(str(model_root / "missing"), roots=roots)
    assert not err.value.exists and err.value.tried == ["the directory does not exist"]
    for name in ("empty", "file"):
        with pytest.raises(ModelNotFound) as err:
            resolve_base_model(str(model_root / name), roots=roots)
        assert err.value.exists and str(model_root) not in "; ".join(err.value.tried)


def test_a_relative_name_is_never_looked_up_in_the_working_directory(model_root, monkeypatch):
    monkeypatch.chdir(model_root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(model_root / "hf"))
    with pytest.raises(ModelNotFound) as err:
        resolve_base_model("tiny", roots=PathRoots([model_root]))  # a hub id, not ./tiny
    assert "local HF cache" in str(err.value) and str(model_root) not in "; ".join(err.value.tried)
