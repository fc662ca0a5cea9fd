"""The control plane's one error type: ``RecserveError`` with a typed ``code``.

The rule: code that refuses or fails an operation a client asked for raises a ``RecserveError`` (or a subclass:
``FleetError``, ``RouterError``, ``RepositoryError``, ``BackupError``) and says *what kind* of refusal it is with
an ``ErrorCode``, at the raise site. Nothing downstream looks at the message to decide the kind. The API turns a
code into a gRPC status in one place, ``control/api/errors.py`` (``STATUS``, ``abort``); other exceptions are bugs
and reach the client as UNKNOWN.

This module imports nothing of the control plane (and not grpc), so every layer may raise these.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.StrEnum):
    """What kind of refusal; the names are the gRPC status names they map to (a ``str``, so ``== "NOT_FOUND"``
    still holds for code that compares names)."""

    #: The request is wrong whatever the fleet's state (a bad value; the message names the field and the rule).
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    #: The model, version, instance, snapshot or rollout named does not exist.
    NOT_FOUND = "NOT_FOUND"
    #: It already is so (a rollout to the version already desired).
    ALREADY_EXISTS = "ALREADY_EXISTS"
    #: The fleet's state does not allow it now (a rollout running, no healthy standby, a file failing its sha256).
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    #: No room: every slot is used.
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    #: Transient: retry later (the fleet is still coming up, an instance did not start, a backup target is down).
    UNAVAILABLE = "UNAVAILABLE"
    #: The call carries no valid token.
    UNAUTHENTICATED = "UNAUTHENTICATED"
    #: The server is built wrong (a refusal the server owes, not the caller).
    INTERNAL = "INTERNAL"


class RecserveError(Exception):
    """A refused or failed control-plane operation; ``code`` (an ``ErrorCode``) says which kind.

    ``code`` may be given as its name (``"NOT_FOUND"``), as existing call sites do; an unknown name is a
    ValueError at the raise site. Without one, the class's ``default_code``.
    """

    default_code: ClassVar[ErrorCode] = ErrorCode.FAILED_PRECONDITION

    def __init__(self, message: str = "", code: ErrorCode | str | None = None):
        super().__init__(message)
        self.code: ErrorCode = self.default_code if code is None else ErrorCode(code)

    def __reduce__(self):  # pickles with its code (Exception's own keeps only ``args``)
        return type(self), (str(self), self.code)
