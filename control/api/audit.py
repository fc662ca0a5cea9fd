"""The control API's bearer-token check and its audit trail.

``ApiGuard`` is a gRPC server interceptor around every ``recserve.control.v1.ControlPlane`` method. A servicer
method that changes anything calls ``guard.authorize(context)`` first (``ControlPlane._auth``): that one call
compares the token in constant time, refuses with UNAUTHENTICATED, and marks the call as mutating. When a mutating
call ends, one ``audit`` event goes to the event log: method, request, caller (peer address and a fingerprint of
the presented token, never the token) and outcome (``ok``, ``refused CODE: details`` or ``failed: message``).
Request bytes that do not parse are refused with INVALID_ARGUMENT before any handler runs, and audited for every
method, since no honest client sends them. Read-only calls are not audited (status polling would drown the log).
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import text_format

from recserve.control.api import errors
from recserve.control.errors import ErrorCode
from recserve.control.keys import fingerprint

#: Longest request text kept in an audit event (requests are small; a huge note is cut, never logged whole).
MAX_REQUEST_TEXT = 200


@dataclass
class _Call:
    method: str
    peer: str
    request: str
    audited: bool = False  # a mutating call (it called authorize) or malformed bytes
    caller: str = "no token"


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request whose bytes did not parse, so the refusal is ours (and audited), not gRPC's."""

    error: str


class ApiGuard(grpc.ServerInterceptor):
    """Authorises and audits the calls of one gRPC service; ``record(message)`` writes one audit event."""

    def __init__(self, token: str, token_file: Path, record: Callable[[str], None],
                 service: str = "recserve.control.v1.ControlPlane"):
        self._token_digest = hashlib.sha256(token.encode("utf-8")).digest()
        self.token_file = token_file
        self.service = service
        self._record = record
        self._calls: dict[int, _Call] = {}  # id(ServicerContext) -> the call it serves
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the token rule
    def authorize(self, context: grpc.ServicerContext) -> None:
        """Refuse (UNAUTHENTICATED) unless the call carries ``authorization: Bearer <token>``; mark it mutating."""
        ok, caller, why = self._check(context.invocation_metadata() or ())
        with self._lock:
            call = self._calls.get(id(context))
        if call is None:  # fail closed: a mutating call that could not be audited does not run
            errors.refuse(context, ErrorCode.INTERNAL, "this call bypassed the audit interceptor (the server was "
                          "built without interceptors=[guard]); refused")
        call.audited, call.caller = True, caller
        if not ok:
            errors.refuse(context, ErrorCode.UNAUTHENTICATED,
                          f"{why}; mutating calls need metadata 'authorization: Bearer <token>' with the token "
                          f"from {self.token_file}")

    def _check(self, metadata) -> tuple[bool, str, str]:
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            return False, "no token", "no 'authorization' metadata"
        if len(values) > 1:
            return False, f"{len(values)} authorization values", "more than one 'authorization' value"
        value = values[0]
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
        scheme, _, credential = raw.partition(b" ")
        if scheme.lower() != b"bearer":  # RFC 7235: the scheme is case-insensitive
            # no scheme text in the log: a token sent without "Bearer " would be the scheme
            return False, f"no Bearer scheme, {fingerprint(raw)}", "the authorization scheme must be 'Bearer'"
        caller = f"token {fingerprint(credential)}"
        # compare digests of bytes: equal lengths, so the time taken says nothing about the token's length either,
        # and no str (compare_digest raises TypeError on non-ASCII str: a refusal would become a failure)
        if not hmac.compare_digest(hashlib.sha256(credential.strip()).digest(), self._token_digest):
            return False, caller, "wrong bearer token"
        return True, caller, ""

    # ------------------------------------------------------------------ interception
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{self.service}/"):
            return handler
        name = method.rsplit("/", 1)[1]
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # protobuf's DecodeError and friends: all mean "not our message"
                return _Malformed(f"{type(exc).__name__}: {exc}"[:200])

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(name, handler.unary_unary), deserialize,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(name, handler.unary_stream), deserialize,
                                                        handler.response_serializer)
        return handler  # the service has no client-streaming methods; nothing to wrap

    def _unary(self, name: str, behavior):
        def run(request, context):
            call = self._begin(name, request, context)
            try:
                self._refuse_malformed(name, request, context)
                response = behavior(request, context)
            except BaseException as exc:
                self._end(call, context, exc)
                raise
            self._end(call, context, None)
            return response

        return run

    def _stream(self, name: str, behavior):
        def run(request, context):
            call = self._begin(name, request, context)
            try:
                self._refuse_malformed(name, request, context)
                yield from behavior(request, context)
            except BaseException as exc:  # GeneratorExit too: the client went away mid-stream
                self._end(call, context, exc)
                raise
            self._end(call, context, None)

        return run

    def _begin(self, name: str, request, context: grpc.ServicerContext) -> _Call:
        if isinstance(request, _Malformed):
            call = _Call(name, context.peer(), "<malformed>", audited=True)
        else:
            text = text_format.MessageToString(request, as_one_line=True)
            if len(text) > MAX_REQUEST_TEXT:
                text = text[:MAX_REQUEST_TEXT] + f"... ({len(text)} chars)"
            call = _Call(name, context.peer(), text)
        with self._lock:
            self._calls[id(context)] = call
        return call

    @staticmethod
    def _refuse_malformed(name: str, request, context: grpc.ServicerContext) -> None:
        if isinstance(request, _Malformed):
            errors.refuse(context, ErrorCode.INVALID_ARGUMENT,
                          f"the request bytes are not a valid {name} request message ({request.error})")

    def _end(self, call: _Call, context: grpc.ServicerContext, exc: BaseException | None) -> None:
        with self._lock:
            self._calls.pop(id(context), None)
        if not call.audited:
            return
        code = context.code()
        if isinstance(exc, GeneratorExit):
            outcome = "cancelled: the client left before the end of the stream"
        elif code is not None and code != grpc.StatusCode.OK:  # context.abort() or set_code()
            details = context.details() or b""
            details = details.decode("utf-8", "replace") if isinstance(details, bytes) else details
            outcome = f"refused {code.name}: {details}"
        elif exc is not None:
            outcome = f"failed: {type(exc).__name__}: {exc}"
        else:
            outcome = "ok"
        message = f"{call.method} {{{call.request}}} from {call.peer} with {call.caller}: {outcome}"[:1000]
        try:
            self._record(message)
        except Exception as err:  # the call has happened: its answer stands; the lost event goes to the log
            print(f"audit event not written ({type(err).__name__}: {err}): {message}", file=sys.stderr, flush=True)

