"""Domain errors carry a kind and no gRPC; the API edge (grpc_errors) maps the kind onto its canonical code."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from neuroweaver_runtime import errors, grpc_errors
from neuroweaver_runtime.errors import DomainError, ErrorKind, InvalidArgument, NotFound, unavailable_from_db_error
from neuroweaver_runtime.grpc_errors import status_code, to_rpc_status


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


@pytest.mark.parametrize("cls", _subclasses(DomainError), ids=lambda c: c.__name__)
def test_every_domain_error_goes_out_with_the_code_of_its_kind(cls):
    error = cls("boom", reason="SOME_REASON")
    status = to_rpc_status(error, "test.neuroweaver.v1")
    assert status.code == getattr(code_pb2, error.kind.name) == status_code(error.kind).value[0]
    assert error.kind is not ErrorKind.UNKNOWN  # every concrete error says what kind it is
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert (info.reason, info.domain, status.message) == ("SOME_REASON", "test.neuroweaver.v1", "boom")


def test_every_kind_has_a_grpc_code():
    assert {status_code(kind).name for kind in ErrorKind} == {kind.name for kind in ErrorKind}
    assert status_code(NotFound.kind) is grpc.StatusCode.NOT_FOUND


def test_field_violations_travel_in_bad_request():
    status = to_rpc_status(InvalidArgument("page_size must not be negative", field="page_size"), "d")
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("page_size", "page_size must not be negative")]


def test_a_lost_database_is_unavailable():
    mapped = unavailable_from_db_error(ConnectionRefusedError(111, "refused"))
    assert mapped is not None and mapped.kind is ErrorKind.UNAVAILABLE
    assert status_code(mapped.kind) is grpc.StatusCode.UNAVAILABLE


def test_domain_side_modules_load_no_grpc():
    # What domain packages may import (errors, names, timestamps, pagination, field masks, etags) stays free of gRPC.
    code = (
        "import sys\n"
        "import neuroweaver_runtime.errors, neuroweaver_runtime.names, neuroweaver_runtime.timestamps\n"
        "import neuroweaver_runtime.pagination, neuroweaver_runtime.fieldmask, neuroweaver_runtime.etag\n"
        "loaded = sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_grpc_mapping_lives_only_at_the_edge():
    for name in ("to_rpc_status", "error_info", "field_violations"):
        assert not hasattr(errors, name) and hasattr(grpc_errors, name)
