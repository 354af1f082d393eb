"""Bearer-token authentication and role-based authorization.

Tokens map to a principal: (subject, project, role); roles are ordered viewer < operator < admin.
Each RPC declares the role it needs; a token works only in its own project (`*` = every project).
Health and reflection are always open. With no tokens configured (embedded mode) every caller is an
anonymous admin.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PermissionDenied, Unauthenticated


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


@dataclass(frozen=True)
class Principal:
    subject: str
    project: str  # "*" for every project
    role: Role

    def allows_project(self, project: str) -> bool:
        return self.project in ("*", project)


ANONYMOUS_ADMIN = Principal("anonymous", "*", Role.ADMIN)
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS_ADMIN)


def current_actor() -> str:
    """Who is calling, for audit records."""
    return principal_var.get().subject


class TokenAuthenticator:
    """Resolves `authorization: Bearer <token>` metadata to a Principal."""

    def __init__(self, tokens: dict[str, Principal]) -> None:
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    @classmethod
    def from_setting(cls, setting: str) -> TokenAuthenticator:
        """`setting` is empty (off), a JSON file path, or inline `token=project:role[:subject],...`.

        JSON file: `{"tokens": [{"token": "...", "project": "default", "role": "operator", "subject": "ci"}]}`.
        """
        if not setting:
            return cls({})
        tokens: dict[str, Principal] = {}
        is_inline = "=" in setting  # inline entries always contain `=`; a long inline list is no path
        path = Path(setting)
        if not is_inline and path.is_file():
            data = json.loads(path.read_text())
            for entry in data.get("tokens", []):
                tokens[entry["token"]] = Principal(
                    entry.get("subject", entry["token"][:6] + "…"), entry["project"], Role[entry["role"].upper()]
                )
        else:
            for item in filter(None, (s.strip() for s in setting.split(","))):
                token, _, rest = item.partition("=")
                parts = rest.split(":")
                if not token or len(parts) < 2:
                    raise ValueError(f"auth token entry {item[:8]}… must be token=project:role[:subject]")
                subject = parts[2] if len(parts) > 2 else f"token-{len(tokens) + 1}"
                tokens[token] = Principal(subject, parts[0], Role[parts[1].upper()])
        return cls(tokens)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token: send `authorization: Bearer <token>`", reason="MISSING_TOKEN")
        presented = authorization[7:].strip()
        for token, principal in self._tokens.items():
            if hmac.compare_digest(token.encode(), presented.encode()):
                return principal
        raise Unauthenticated("unknown bearer token", reason="INVALID_TOKEN")


def authorize(principal: Principal, required: Role, projects: set[str]) -> None:
    if principal.role < required:
        raise PermissionDenied(
            f"this call needs role {required.name.lower()}; the token has {principal.role.name.lower()}",
            reason="ROLE_TOO_LOW",
            metadata={"required_role": required.name.lower()},
        )
    for project in projects:
        if not principal.allows_project(project):
            raise PermissionDenied(
                f"the token is not valid for project {project!r}", reason="WRONG_PROJECT", metadata={"project": project}
            )


def check_project(name: str) -> None:
    """For client-streaming RPCs, whose messages the interceptor cannot see up front: check a name's project."""
    from .names import project_of

    project = project_of(name)
    if project is not None and not principal_var.get().allows_project(project):
        raise PermissionDenied(f"the token is not valid for project {project!r}", reason="WRONG_PROJECT")
