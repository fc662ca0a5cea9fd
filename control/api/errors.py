"""The one place the control API turns an ``ErrorCode`` (control/errors.py) into a gRPC status.

Every servicer method (control/api/server.py, control/backup/api.py, the token check in control/api/audit.py)
refuses through ``abort`` or ``call``: none names a ``grpc.StatusCode`` itself. recctl maps the statuses back to
exit codes in control/api/cli_output.py ``classify``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, TypeVar

import grpc

from recserve.control.errors import ErrorCode, RecserveError

T = TypeVar("T")

#: ErrorCode -> the status a client sees. Every code has one (tests/test_errors.py fails on a code without).
STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_of(code: ErrorCode) -> grpc.StatusCode:
    return STATUS[code]


def abort(context: grpc.ServicerContext, error: RecserveError) -> NoReturn:
    """End the call with ``error``'s status and its message as the details (``context.abort`` raises)."""
    context.abort(STATUS[error.code], str(error))
    raise AssertionError("context.abort returned")  # grpc's raises; a context that does not is a bug


def refuse(context: grpc.ServicerContext, code: ErrorCode, message: str) -> NoReturn:
    """A refusal decided in the servicer itself (no exception raised below it)."""
    abort(context, RecserveError(message, code))


def call(context: grpc.ServicerContext, fn: Callable[..., T], *args) -> T:
    """``fn(*args)``; a ``RecserveError`` from it ends the call with its status. Other exceptions propagate
    (gRPC answers UNKNOWN: a bug, not a refusal)."""
    try:
        return fn(*args)
    except RecserveError as exc:
        abort(context, exc)
