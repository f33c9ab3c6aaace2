"""Serving errors carry a gRPC status code; REST maps it to TF Serving's HTTP code.

Every failure a request can meet (unknown model, bad input, a model op failing)
is a :class:`ServingError` with the canonical code TF Serving uses for the same
situation, so clients written against TF Serving see the same codes over gRPC
and the same HTTP statuses over REST (``tensorflow_serving/model_servers/http_server.cc``).

Example::

    >>> err = ServingError.not_found("Servable not found for request: Latest(x)")
    >>> err.code.name, err.http_status
    ('NOT_FOUND', 404)
"""

from __future__ import annotations

import re

import grpc

MAX_MESSAGE_CHARS = 1000  # longest error message sent to a client
_PATH_RE = re.compile(r"""(?:[A-Za-z]:)?(?:/[\w.@+~-]+){2,}/?""")

# TF Serving's `ToHTTPStatusCode` (http_server.cc).
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# tensorflow.error.Code numbers are the gRPC code numbers.
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_number(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` for a canonical code number (``tf.errors.OpError.error_code``)."""
    return _BY_NUMBER.get(int(number), grpc.StatusCode.UNKNOWN)


def clean_message(message: str) -> str:
    r"""``message`` without stack traces or server file paths, at most :data:`MAX_MESSAGE_CHARS`.

    TensorFlow op errors append where the failing op was defined (``File "/srv/...",
    line N``); clients get the error itself. Indented lines (traceback frames, graph
    context) are dropped and absolute paths keep only their last part (``.../name``).

    >>> clean_message('Graph execution error:\n\nDetected at node x defined at (most recent call last):\n'
    ...               '  File "/srv/app/model.py", line 3, in f\n    y = g(x)\nassertion failed: [x > 0]\n'
    ...               '\t [[{{node x}}]] [Op:__inference_f_12]')
    'Graph execution error: assertion failed: [x > 0]'
    >>> clean_message("cannot parse /models/m/3/batching_params.pbtxt")
    'cannot parse .../batching_params.pbtxt'
    """
    lines = []
    for line in str(message).splitlines():
        if not line.strip() or line[:1] in (" ", "\t") or "(most recent call last)" in line:
            continue
        lines.append(re.sub(r"\s*\[Op:[^\]]*\]", "", line).strip())
    text = _PATH_RE.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], " ".join(lines))
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def wire_message(message: str) -> str:
    """``message`` cut to :data:`MAX_MESSAGE_CHARS` for a client: messages may quote what the
    client sent (a model or signature name), which must not come back megabytes long.

    >>> len(wire_message("Serving signature key " + "s" * 10**6 + " not found"))
    1003
    """
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status TF Serving's REST API answers for a gRPC status code."""
    return _HTTP_STATUS.get(code, 500)


class ServingError(ValueError):
    """A request failed with a canonical status ``code`` and a message for the caller.

    A ``ValueError`` subclass, so ``tfrec query`` reports it as a one-line error.

    Args:
        code: ``grpc.StatusCode`` of the failure.
        message: ``str``, what went wrong, naming the offending value and what was expected.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return http_status(self.code)

    def __str__(self) -> str:
        return self.message

    @classmethod
    def invalid_argument(cls, message: str) -> "ServingError":
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message)

    @classmethod
    def not_found(cls, message: str) -> "ServingError":
        return cls(grpc.StatusCode.NOT_FOUND, message)

    @classmethod
    def failed_precondition(cls, message: str) -> "ServingError":
        return cls(grpc.StatusCode.FAILED_PRECONDITION, message)

    @classmethod
    def permission_denied(cls, message: str) -> "ServingError":
        return cls(grpc.StatusCode.PERMISSION_DENIED, message)

    @classmethod
    def unavailable(cls, message: str) -> "ServingError":
        return cls(grpc.StatusCode.UNAVAILABLE, message)

    @classmethod
    def from_exception(cls, err: BaseException) -> "ServingError":
        """Wrap an exception raised while running a model: TF op errors keep their code."""
        if isinstance(err, ServingError):
            return err
        number = getattr(err, "error_code", None)  # tf.errors.OpError
        if number is not None:
            message = getattr(err, "message", None) or str(err)
            return cls(status_code_from_number(number), clean_message(message))
        return cls(grpc.StatusCode.INTERNAL, clean_message(f"{type(err).__name__}: {err}"))
