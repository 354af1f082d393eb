"""Shared runtime pieces: filters, page tokens, field masks, resource names, auth, configuration."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from neuroweaver_runtime.auth import Principal, Role, TokenAuthenticator, authorize
from neuroweaver_runtime.config import ServiceConfig, load_config
from neuroweaver_runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from neuroweaver_runtime.fieldmask import validate_update_mask
from neuroweaver_runtime.filtering import Comparison, parse_filter, parse_order_by
from neuroweaver_runtime.names import ResourceName, project_of, validate_id
from neuroweaver_runtime.pagination import PageTokens, page_size

# -- filters -------------------------------------------------------------------------------------


def test_filter_parses_conjunctions_quotes_and_labels():
    parsed = parse_filter('specialization = "parts" AND labels.team != ml AND state=ACTIVE', {"specialization", "state"})
    assert parsed == [
        Comparison("specialization", "=", "parts"), Comparison("labels.team", "!=", "ml"), Comparison("state", "=", "ACTIVE"),
    ]  # fmt: skip
    assert parsed[1].label_key == "team" and parsed[0].label_key is None


def test_filter_unescapes_quoted_values():
    assert parse_filter(r'name = "a \"b\" c"', {"name"}) == [Comparison("name", "=", 'a "b" c')]


def test_empty_filter_is_no_filter():
    assert parse_filter("", {"a"}) == [] and parse_filter("   ", {"a"}) == []


@pytest.mark.parametrize(
    "text",
    [
        "owner = x", "state", "state =", "= x", "state = x OR state = y", "state = x AND", "state = x state = y",
        "state > x", "state = x; drop table", "labels. = x", "state = \"unterminated", "x" * 2001,
    ],
)  # fmt: skip
def test_bad_filters(text):
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, {"state"})
    assert caught.value.reason == "INVALID_FILTER" and caught.value.field == "filter"


def test_enum_fields_take_the_contract_name_or_the_bare_name_in_any_case():
    enums = {"state": ("STATE_", {"ACTIVE", "ARCHIVED"})}
    for spelling in ("STATE_ACTIVE", "ACTIVE", "active", "state_Active", '"STATE_ACTIVE"'):
        assert parse_filter(f"state != {spelling}", {"name"}, enums=enums) == [Comparison("state", "!=", "ACTIVE")]
    assert parse_filter("name = state_x", {"name"}, enums=enums) == [Comparison("name", "=", "state_x")]  # not an enum
    for bad in ("BOGUS", "STATE_UNSPECIFIED", "UNSPECIFIED", "STATE_", "STATE_STATE_ACTIVE", "ACTIVE_STATE"):
        with pytest.raises(InvalidArgument) as caught:
            parse_filter(f"name = x AND state = {bad}", {"name"}, enums=enums)
        assert caught.value.reason == "INVALID_FILTER" and caught.value.field == "filter"
        assert f"unknown state {bad!r}; one of: STATE_ACTIVE, STATE_ARCHIVED" in str(caught.value), str(caught.value)
    with pytest.raises(InvalidArgument) as caught:  # enum fields are filterable fields
        parse_filter("colour = red", {"name"}, enums=enums)
    assert "filterable fields: name, state, labels.<key>" in str(caught.value)


def test_labels_can_be_disallowed():
    with pytest.raises(InvalidArgument):
        parse_filter("labels.a = b", {"state"}, allow_labels=False)


def test_order_by():
    assert parse_order_by("", {"name", "create_time"}, "name") == ("name", False)
    assert parse_order_by("create_time desc", {"name", "create_time"}, "name") == ("create_time", True)
    assert parse_order_by(" name asc ", {"name"}, "name") == ("name", False)
    for bad in ("owner", "name sideways", "name desc extra"):
        with pytest.raises(InvalidArgument) as caught:
            parse_order_by(bad, {"name"}, "name")
        assert caught.value.reason == "INVALID_ORDER_BY"


# -- pagination ----------------------------------------------------------------------------------


def test_page_size_rules():
    assert page_size(0) == 50 and page_size(7) == 7 and page_size(5000) == 1000
    with pytest.raises(InvalidArgument) as caught:
        page_size(-1)
    assert caught.value.reason == "INVALID_PAGE_SIZE"


def test_page_token_round_trip_and_first_page():
    tokens = PageTokens("secret")
    token = tokens.encode(["2024-01-01T00:00:00", "projects/p/models/a"], ["projects/p", "", "name"])
    assert tokens.decode(token, ["projects/p", "", "name"]) == ["2024-01-01T00:00:00", "projects/p/models/a"]
    assert tokens.decode("", ["anything"]) is None


def _reason(fn) -> str:
    with pytest.raises(InvalidArgument) as caught:
        fn()
    return caught.value.reason


def test_tampered_and_foreign_tokens_are_rejected():
    tokens = PageTokens("secret")
    query = ["projects/p", "", ""]
    token = tokens.encode(["a", 1], query)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    body = json.loads(raw[16:])
    body["c"] = ["z", 999]  # a forged cursor with the old signature
    forged = base64.urlsafe_b64encode(bytes(raw[:16]) + json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (forged, flipped, "not-a-token", "!!!", token[:10]):
        assert _reason(lambda b=bad: tokens.decode(b, query)) == "INVALID_PAGE_TOKEN"
    assert _reason(lambda: PageTokens("other-secret").decode(token, query)) == "INVALID_PAGE_TOKEN"


def test_token_reused_with_another_query_is_rejected():
    tokens = PageTokens(b"k")
    token = tokens.encode([1], ["projects/p", "state = ACTIVE", ""])
    assert _reason(lambda: tokens.decode(token, ["projects/p", "state = ARCHIVED", ""])) == "PAGE_TOKEN_QUERY_MISMATCH"
    assert _reason(lambda: tokens.decode(token, ["projects/q", "state = ACTIVE", ""])) == "PAGE_TOKEN_QUERY_MISMATCH"


# -- field masks ---------------------------------------------------------------------------------


def test_update_mask():
    assert validate_update_mask(["labels", "description"], {"labels", "description", "x"}) == {"labels", "description"}
    with pytest.raises(InvalidArgument) as caught:
        validate_update_mask([], {"labels"})
    assert caught.value.reason == "MISSING_UPDATE_MASK"
    with pytest.raises(InvalidArgument) as caught:
        validate_update_mask(["labels", "state"], {"labels"})
    assert caught.value.reason == "INVALID_UPDATE_MASK" and caught.value.field == "update_mask.paths"


# -- resource names ------------------------------------------------------------------------------

VERSION = ResourceName("projects/{project}/models/{model}/versions/{version}", (("version", r"[0-9A-Za-z.\-]{1,128}"),))


def test_names_parse_and_format():
    assert VERSION.parse("projects/default/models/parts-advisor/versions/1.0.0-rc.1") == {
        "project": "default", "model": "parts-advisor", "version": "1.0.0-rc.1",
    }  # fmt: skip
    assert VERSION.format(project="p", model="m", version="2.0.0") == "projects/p/models/m/versions/2.0.0"
    assert VERSION.variables == ["project", "model", "version"]
    assert project_of("projects/p/models/m") == "p" and project_of("models/m") is None and project_of("projects/") is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "MISSING_NAME"),
        ("projects/default/models/m", "MALFORMED_NAME"),
        ("projects/default/modelz/m/versions/1.0.0", "MALFORMED_NAME"),
        ("projects/Default/models/m/versions/1.0.0", "MALFORMED_NAME"),
        ("projects/default/models/-m/versions/1.0.0", "MALFORMED_NAME"),
        ("projects/default/models/m/versions/1.0.0+b", "MALFORMED_NAME"),
        ("projects/default/models/m/versions/", "MALFORMED_NAME"),
        ("projects/default/models/m/versions/1.0.0/extra", "MALFORMED_NAME"),
    ],
)
def test_malformed_names(name, reason):
    with pytest.raises(InvalidArgument) as caught:
        VERSION.parse(name, "name")
    assert caught.value.reason == reason and caught.value.field == "name"


def test_ids():
    assert validate_id("a", "id") == "a" and validate_id("a" * 63, "id")
    for bad in ("", "A", "1a", "a-", "a_b", "a" * 64):
        with pytest.raises(InvalidArgument):
            validate_id(bad, "id")


# -- auth ----------------------------------------------------------------------------------------


def test_auth_off_means_anonymous_admin():
    principal = TokenAuthenticator.from_setting("").authenticate(None)
    assert principal.role is Role.ADMIN and principal.allows_project("anything")


def test_inline_tokens():
    auth = TokenAuthenticator.from_setting("t1=default:viewer:alice, t2=*:admin")
    assert auth.authenticate("Bearer t1") == Principal("alice", "default", Role.VIEWER)
    assert auth.authenticate("bearer t2").role is Role.ADMIN
    for header, reason in ((None, "MISSING_TOKEN"), ("Basic t1", "MISSING_TOKEN"), ("Bearer nope", "INVALID_TOKEN")):
        with pytest.raises(Unauthenticated) as caught:
            auth.authenticate(header)
        assert caught.value.reason == reason
    with pytest.raises(ValueError):
        TokenAuthenticator.from_setting("broken-entry")
    with pytest.raises(KeyError):
        TokenAuthenticator.from_setting("t=default:superuser")


def test_token_file(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"token": "abc", "project": "p", "role": "Operator", "subject": "ci"}]}))
    assert TokenAuthenticator.from_setting(str(path)).authenticate("Bearer abc") == Principal("ci", "p", Role.OPERATOR)


def test_authorize_roles_and_projects():
    operator = Principal("ci", "default", Role.OPERATOR)
    authorize(operator, Role.VIEWER, {"default"})
    authorize(operator, Role.OPERATOR, set())
    with pytest.raises(PermissionDenied) as caught:
        authorize(operator, Role.ADMIN, {"default"})
    assert caught.value.reason == "ROLE_TOO_LOW"
    with pytest.raises(PermissionDenied) as caught:
        authorize(operator, Role.VIEWER, {"other"})
    assert caught.value.reason == "WRONG_PROJECT"
    authorize(Principal("root", "*", Role.ADMIN), Role.ADMIN, {"a", "b"})


# -- configuration -------------------------------------------------------------------------------


@dataclass
class DemoConfig(ServiceConfig):
    migrate: bool = True
    ratio: float = field(default=0.5)


def test_config_precedence_defaults_env_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("NW_DEMO_PORT", "7000")
    monkeypatch.setenv("NW_DEMO_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("NW_DEMO_MIGRATE", "off")
    monkeypatch.setenv("NW_DEMO_RATIO", "0.25")
    config = load_config(DemoConfig, "demo", ["--port", "7001", "--data-dir", str(tmp_path)])
    assert config.port == 7001  # flag beats env
    assert config.log_level == "DEBUG" and config.migrate is False and config.ratio == 0.25  # env beats default
    assert config.metrics_port == 0 and config.host == "127.0.0.1"  # defaults
    assert config.data_dir == str(tmp_path)
    assert load_config(DemoConfig, "demo", ["--migrate"]).migrate is True
    assert load_config(DemoConfig, "demo", ["--metrics-port", "-1"]).metrics_port == -1


def test_config_unused_settings_are_neither_offered_nor_accepted(monkeypatch, capsys):
    @dataclass
    class NoDatabase(DemoConfig):
        unused_settings: ClassVar[frozenset[str]] = frozenset({"database_url", "port"})

    with pytest.raises(SystemExit):
        load_config(NoDatabase, "demo", ["--help"])
    assert "--database-url" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        load_config(NoDatabase, "demo", ["--database-url", "sqlite://"])
    assert "unrecognized arguments: --database-url" in capsys.readouterr().err
    monkeypatch.setenv("NW_DEMO_PORT", "7000")
    with pytest.raises(SystemExit, match="NW_DEMO_PORT is set, but demo has no port setting"):
        load_config(NoDatabase, "demo", [])
    assert load_config(DemoConfig, "demo", []).port == 7000  # the same variable, for a config that uses it


def test_config_rejects_bad_env_values(monkeypatch):
    monkeypatch.setenv("NW_DEMO_PORT", "seventy")
    with pytest.raises(SystemExit, match="port expects int"):
        load_config(DemoConfig, "demo", [])
    monkeypatch.delenv("NW_DEMO_PORT")
    monkeypatch.setenv("NW_DEMO_MIGRATE", "maybe")
    with pytest.raises(SystemExit, match="boolean"):
        load_config(DemoConfig, "demo", [])


def test_sqlite_default_lives_in_the_data_dir(tmp_path):
    config = ServiceConfig(data_dir=str(tmp_path / "d"))
    assert config.sqlite_default("registry") == f"sqlite+aiosqlite:///{tmp_path / 'd' / 'registry.db'}"
    assert (tmp_path / "d").is_dir()
