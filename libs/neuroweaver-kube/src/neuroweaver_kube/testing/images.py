"""Images for the stand-in's pod runner: an image name maps to an image filesystem and an entry point.

No image is built or pulled. An image is "the install" a container of it would see, bound read-only from this
machine: ``/usr`` (and the ``/bin``, ``/lib*``, ``/sbin`` links), a few ``/etc`` essentials, the Python prefix the
repository's virtualenv was made from, the virtualenv itself (at ``/opt/venv``, where the images keep it, and at
its own path so its scripts' shebangs resolve) with the editable source directories its ``.pth`` files point at,
and the repository files the Dockerfile copies into the image (``COPY deploy/docker/... /usr/local/bin/...``); a
``node_modules`` copied from a Node stage (``COPY --from=assets /assets/node_modules ...``: npm files at the versions
``package-lock.json`` pins) is the repository's ``node_modules``, which ``make install`` fills from the same lock.
Nothing else of the host is visible: not the repository's data or artifact folders, not ``/tmp``, not ``/root``.

ENTRYPOINT, CMD, ENV, WORKDIR and USER come from ``deploy/docker/<name>.Dockerfile`` (exec form; the last stage and
the stages it is built ``FROM``), so a manifest's ``args`` replace CMD exactly as in a cluster. Image references
match on the repository's last path segment with the tag or digest dropped: ``neuroweaver/registry:0.1.0``,
``ghcr.io/acme/registry@sha256:...`` and ``registry`` all name ``registry.Dockerfile``. ``python:3.11-slim-bookworm``
(the base every Dockerfile names) is the bare Python install with the virtualenv, entry point ``python3``.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

#: The PATH of the official Debian-based Python images before an ENV changes it.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: /etc entries a container's libc, TLS and Python need; those missing here are skipped.
ETC_ESSENTIALS = (
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "nsswitch.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "alternatives",
    "protocols",
    "services",
    "mime.types",
    "gai.conf",
)


@dataclass(frozen=True)
class Bind:
    source: str
    dest: str
    kind: str = "ro-bind"  # ro-bind | symlink (source = target) | tmpfs | remount-ro (dest only)


@dataclass
class Image:
    """What a container of this image starts from."""

    name: str
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: tuple[int, int] | None = None
    binds: list[Bind] = field(default_factory=list)


def image_key(reference: str) -> str:
    """``registry.example/ns/name:tag@sha256:...`` → ``name``."""
    ref = reference.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def _venv_binds(venv: Path) -> list[Bind]:
    """The virtualenv at /opt/venv and at its own path, its base Python prefix, and the editable source dirs."""
    venv = venv.resolve()
    binds = [Bind(str(venv), "/opt/venv"), Bind(str(venv), str(venv))]
    cfg = venv / "pyvenv.cfg"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                prefix = Path(value.strip()).parent
                binds.append(Bind(str(prefix), str(prefix)))
    for site in venv.glob("lib/python*/site-packages"):
        for pth in site.glob("*.pth"):
            for line in pth.read_text().splitlines():
                line = line.strip()
                if line.startswith("/") and Path(line).is_dir():
                    binds.append(Bind(line, line))
    return binds


def _host_binds() -> list[Bind]:
    binds: list[Bind] = [Bind("/usr", "/usr")]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / top
        if p.is_symlink():
            binds.append(Bind(os.readlink(p), f"/{top}", "symlink"))
        elif p.is_dir():
            binds.append(Bind(str(p), f"/{top}"))
    for name in ETC_ESSENTIALS:
        p = Path("/etc") / name
        if p.exists():
            binds.append(Bind(str(p), str(p)))
    return binds


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        return [str(v) for v in parsed]
    return ["/bin/sh", "-c", value]  # shell form


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _expand(value: str, env: dict[str, str], args: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, args.get(name, BASE_PATH if name == "PATH" else ""))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, value)


def parse_dockerfile(path: Path, repo_root: Path, venv: Path, name: str | None = None) -> Image:
    """The image of the Dockerfile's last stage (following ``FROM <earlier stage>``) as this machine runs it."""
    repo_root = repo_root.resolve()
    stages: dict[str, list[tuple[str, str]]] = {}
    parents: dict[str, str] = {}
    order: list[str] = []
    current = ""
    global_args: dict[str, str] = {}
    for word, rest in _instructions(path.read_text()):
        if word == "ARG" and not current:
            k, _, v = rest.partition("=")
            global_args[k.strip()] = v.strip()
            continue
        if word == "FROM":
            parts = rest.split()
            base = parts[0]
            current = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"#{len(order)}"
            order.append(current)
            parents[current] = base
            stages[current] = []
            continue
        stages[current].append((word, rest))
    chain: list[str] = []
    stage: str | None = order[-1]
    while stage is not None and stage in stages:
        chain.insert(0, stage)
        stage = parents.get(stage)
    image = Image(name=name or path.name.removesuffix(".Dockerfile"))
    copies: list[Bind] = []
    image.binds = _host_binds() + _venv_binds(venv)
    for stage_name in chain:
        for word, rest in stages[stage_name]:
            if word == "ENV":
                for token in shlex.split(rest):
                    k, sep, v = token.partition("=")
                    if sep:
                        image.env[k] = _expand(v, image.env, global_args)
            elif word == "WORKDIR":
                image.workdir = rest
            elif word == "USER":
                uid, _, gid = rest.partition(":")
                if uid.isdigit():
                    image.user = (int(uid), int(gid) if gid.isdigit() else int(uid))
            elif word == "ENTRYPOINT":
                image.entrypoint = _exec_form(rest)
                image.cmd = []  # a new ENTRYPOINT resets CMD, as in docker
            elif word == "CMD":
                image.cmd = _exec_form(rest)
            elif word == "COPY" and rest.startswith("--from=") and rest.split()[1].endswith("/node_modules"):
                if (repo_root / "node_modules").is_dir():
                    copies.append(Bind(str(repo_root / "node_modules"), rest.split()[2]))
            elif word == "COPY" and "--from=" not in rest:
                parts = [p for p in shlex.split(rest) if not p.startswith("--")]
                *sources, dest = parts
                for src in sources:
                    host = repo_root / src
                    if host.exists():
                        target = dest if not dest.endswith("/") else dest + host.name
                        copies.append(Bind(str(host), target))
    image.binds += _copied_files(copies)
    return image


def _copied_files(copies: list[Bind]) -> list[Bind]:
    """Binds for files a Dockerfile copies into a directory of the read-only install (``/usr/local/bin``): that
    directory becomes a tmpfs holding the host's entries (bound one by one) and the copied files, then read-only."""
    out: list[Bind] = []
    for parent in sorted({posixpath.dirname(c.dest) for c in copies}):
        if parent == "/usr" or parent.startswith("/usr/"):
            out.append(Bind("", parent, "tmpfs"))
            host_dir = Path(parent)
            if host_dir.is_dir():
                names = {posixpath.basename(c.dest) for c in copies if posixpath.dirname(c.dest) == parent}
                for entry in sorted(host_dir.iterdir()):
                    if entry.name not in names:
                        kind = "symlink" if entry.is_symlink() else "ro-bind"
                        out.append(Bind(os.readlink(entry) if entry.is_symlink() else str(entry), str(entry), kind))
        out += [c for c in copies if posixpath.dirname(c.dest) == parent]
        if parent == "/usr" or parent.startswith("/usr/"):
            out.append(Bind("", parent, "remount-ro"))
    return out


def python_image(venv: Path, name: str = "python") -> Image:
    """The Python base image: the host's Python prefix and the repository's virtualenv on PATH, entry point python3."""
    return Image(
        name=name,
        cmd=["python3"],
        env={"PATH": f"/opt/venv/bin:{BASE_PATH}", "LANG": "C.UTF-8"},
        binds=_host_binds() + _venv_binds(venv),
    )


def default_images(repo_root: Path, venv: Path | None = None) -> dict[str, Image]:
    """Every ``deploy/docker/*.Dockerfile`` of the repository plus ``python``, keyed by :func:`image_key`."""
    venv = venv or repo_root / ".venv"
    images = {"python": python_image(venv)}
    for dockerfile in sorted((repo_root / "deploy" / "docker").glob("*.Dockerfile")):
        image = parse_dockerfile(dockerfile, repo_root, venv)
        images[image.name] = image
    return images
