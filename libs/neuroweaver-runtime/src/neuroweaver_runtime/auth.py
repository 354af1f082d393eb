"""Bearer-token authentication, role-based authorization, service delegation and project grants.

Tokens map to a principal: (subject, project, role); roles are ordered viewer < operator < admin.
Each RPC declares the role it needs; a token works only in its own project (`*` = every project).
Health and reflection are always open. With no tokens configured (embedded mode) every caller is an
anonymous admin.

Service identities (role `service` in the token table) never act as themselves: a service that calls
another for a caller sends the caller's identity in `x-nw-on-behalf-of` (`project:role:subject`), and the
callee authorizes that identity, not the service's. A call from a service token without it is refused, so
no service holds a blanket all-projects credential, and audit records name the real caller.

Projects see only their own resources. A project may grant another read access to its models and judges
(`project_grants`, e.g. `shared=>a|b`): a caller in `a` may then reference `projects/shared/models/...` in
a request, and read it, but never write into `shared`.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import hmac
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from .errors import PermissionDenied, Unauthenticated

ON_BEHALF_OF_HEADER = "x-nw-on-behalf-of"
_SUBJECT = re.compile(r"^[^\x00-\x1f:]{1,128}$")


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


@dataclass(frozen=True)
class Principal:
    subject: str
    project: str  # "*" for every project
    role: Role
    delegate: bool = False  # a service identity: acts only on behalf of a caller
    via: str = ""  # the service that relayed this caller's identity, if any

    def allows_project(self, project: str) -> bool:
        return self.project in ("*", project)

    def header(self) -> str:
        """This principal as the on-behalf-of value another service accepts from a delegate."""
        return f"{self.project}:{self.role.name.lower()}:{quote(self.subject, safe='@.+-_')}"


ANONYMOUS_ADMIN = Principal("anonymous", "*", Role.ADMIN)
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS_ADMIN)


def current_actor() -> str:
    """Who is calling, for audit records: the real caller, also when a service relayed the call."""
    return principal_var.get().subject


def current_principal() -> Principal:
    return principal_var.get()


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Background work (a follower, a worker) calls other services as `principal` (sent on-behalf-of)."""
    reset = principal_var.set(principal)
    try:
        yield principal
    finally:
        principal_var.reset(reset)


def parse_principal(value: str, *, via: str = "") -> Principal:
    """`project:role:subject` (the on-behalf-of form) → Principal; ValueError when malformed."""
    project, role, quoted = (value.split(":", 2) + ["", ""])[:3]
    subject = unquote(quoted)
    if not project or not _SUBJECT.match(subject) or role.upper() not in Role.__members__:
        raise ValueError("expected project:role:subject")
    if project != "*" and not re.match(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", project):
        raise ValueError("invalid project")
    return Principal(subject, project, Role[role.upper()], via=via)


def _identity_table(setting: str, key: str, what: str) -> dict[str, Principal]:
    """`setting`: empty, a JSON file path, or inline `credential=project:role[:subject],...`.

    JSON file: `{"<key>s": [{"<key>": "...", "project": "default", "role": "operator", "subject": "ci"}]}`.
    Role `service` makes a delegate: `svc-token=*:service:trainer`.
    """
    table: dict[str, Principal] = {}
    if not setting:
        return table
    is_inline = "=" in setting  # inline entries always contain `=`; a long inline list is no path
    path = Path(setting)
    if not is_inline and path.is_file():
        data = json.loads(path.read_text())
        for entry in data.get(key + "s", []):
            subject = entry.get("subject", entry[key][:6] + "...")
            table[entry[key]] = _principal(subject, entry["project"], entry["role"])
        return table
    for item in filter(None, (s.strip() for s in setting.split(","))):
        credential, _, rest = item.partition("=")
        parts = rest.split(":")
        if not credential or len(parts) < 2:
            raise ValueError(f"{what} entry {item[:8]}... must be {key}=project:role[:subject]")
        subject = parts[2] if len(parts) > 2 else f"{what.split()[0]}-{len(table) + 1}"
        table[credential] = _principal(subject, parts[0], parts[1])
    return table


class TokenAuthenticator:
    """Resolves the caller to a Principal: a bearer token (`authorization: Bearer <token>`) or, without one, the
    common name of a verified client certificate (mTLS) found in the certificate table; then a delegate's
    on-behalf-of header."""

    def __init__(self, tokens: dict[str, Principal], certificates: dict[str, Principal] | None = None) -> None:
        self._tokens = tokens
        self._certificates = certificates or {}

    @property
    def enabled(self) -> bool:
        return bool(self._tokens or self._certificates)

    @property
    def uses_certificates(self) -> bool:
        return bool(self._certificates)

    @classmethod
    def from_setting(cls, setting: str, certificates: str = "") -> TokenAuthenticator:
        """`setting`: the token table (`token=project:role[:subject],...` or a JSON file of `tokens`);
        `certificates`: the client-certificate table (`common-name=project:role[:subject],...` or a JSON file of
        `common_names`)."""
        return cls(_identity_table(setting, "token", "auth token"), _identity_table(certificates, "common_name", "cert"))

    def authenticate(
        self, authorization: str | None, on_behalf_of: str | None = None, peer_common_name: str | None = None
    ) -> Principal:
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if authorization:
            principal = self._by_token(authorization)
        elif peer_common_name is not None and peer_common_name in self._certificates:
            principal = self._certificates[peer_common_name]
        else:
            raise Unauthenticated("missing bearer token: send `authorization: Bearer <token>`", reason="MISSING_TOKEN")
        if not principal.delegate:
            if on_behalf_of:
                raise PermissionDenied(f"only service identities may send {ON_BEHALF_OF_HEADER}", reason="DELEGATION_NOT_ALLOWED")
            return principal
        if not on_behalf_of:
            raise PermissionDenied(
                f"a service identity acts only on behalf of a caller: send {ON_BEHALF_OF_HEADER}",
                reason="ON_BEHALF_OF_REQUIRED",
            )
        try:
            caller = parse_principal(on_behalf_of, via=principal.subject)
        except ValueError:
            raise Unauthenticated(f"{ON_BEHALF_OF_HEADER} must be project:role:subject", reason="INVALID_ON_BEHALF_OF") from None
        # A platform-wide caller (`*`) may be relayed only by a platform-wide service identity.
        if not principal.allows_project(caller.project) or (caller.project == "*" and principal.project != "*"):
            raise PermissionDenied("the service identity may not act in that project", reason="WRONG_PROJECT")
        return caller

    def _by_token(self, authorization: str) -> Principal:
        if not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token: send `authorization: Bearer <token>`", reason="MISSING_TOKEN")
        presented = authorization[7:].strip().encode()
        principal = None
        for token, candidate in self._tokens.items():
            if hmac.compare_digest(token.encode(), presented):
                principal = candidate
        if principal is None:
            raise Unauthenticated("unknown bearer token", reason="INVALID_TOKEN")
        return principal


def _principal(subject: str, project: str, role: str) -> Principal:
    if role.lower() == "service":
        return Principal(subject, project, Role.ADMIN, delegate=True)
    return Principal(subject, project, Role[role.upper()])


class ProjectGrants:
    """Read grants between projects: `granting=>reader|reader;other=>reader` (default: none)."""

    def __init__(self, grants: Mapping[str, frozenset[str]] | None = None) -> None:
        self._readers = dict(grants or {})

    @classmethod
    def from_setting(cls, setting: str) -> ProjectGrants:
        grants: dict[str, frozenset[str]] = {}
        for item in filter(None, (s.strip() for s in (setting or "").split(";"))):
            granting, sep, readers = item.partition("=>")
            names = frozenset(r.strip() for r in readers.split("|") if r.strip())
            if not sep or not granting.strip() or not names:
                raise ValueError(f"project grant {item[:40]!r} must be granting=>reader|reader")
            grants[granting.strip()] = grants.get(granting.strip(), frozenset()) | names
        return cls(grants)

    def may_read(self, reader: str, project: str) -> bool:
        return reader in self._readers.get(project, ())


NO_GRANTS = ProjectGrants()
# Resources another project may be granted read access to (never experiments, jobs or deployments).
_GRANTABLE = re.compile(r"^projects/[^/]+/(models|judges)/")


def authorize(
    principal: Principal,
    required: Role,
    projects: set[str],
    *,
    references: Iterable[str] = (),
    grants: ProjectGrants = NO_GRANTS,
) -> None:
    """`projects`: projects of the names the call acts on; `references`: names it only reads (nested fields).

    A reference into another project passes only when that project grants the caller's project read access
    to it; a read-only call (`required` viewer) may also act on such names directly.
    """
    if principal.role < required:
        raise PermissionDenied(
            f"this call needs role {required.name.lower()}; the token has {principal.role.name.lower()}",
            reason="ROLE_TOO_LOW",
            metadata={"required_role": required.name.lower()},
        )
    for project in projects:
        if not principal.allows_project(project):
            _wrong_project(project)
    for name in references:
        project = name[len("projects/") :].split("/", 1)[0]
        if principal.allows_project(project):
            continue
        if not (_GRANTABLE.match(name) and grants.may_read(principal.project, project)):
            _wrong_project(project)


def _wrong_project(project: str) -> None:
    # The same answer whether or not anything by that name exists: no existence oracle.
    raise PermissionDenied(
        f"the caller has no access to project {project[:63]!r}",
        reason="WRONG_PROJECT",
        metadata={"project": project[:63]},
    )
