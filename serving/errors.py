"""The one error type the server raises for a request, carrying the gRPC status it maps to."""

import grpc
from google.protobuf import message

# How tensorflow_serving/model_servers/http_rest_api_handler maps a status to an HTTP code.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

# A message echoes what the client sent (a model name, a label, a path); gRPC carries it in a trailer whose size
# is limited (8 KB by default), so a 20,000-character model name turned NOT_FOUND into RESOURCE_EXHAUSTED.
MAX_MESSAGE_CHARS = 1000


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters in all)"
        super().__init__(message)
        self.code = code
        self.message = message

    def detached(self) -> "ServingError":
        """The same status and message as a new error, with no traceback, cause or context: an error kept
        after its handler has ended (on a batch task, re-raised by the waiting thread) must not lead back to
        the frames that raised it, which hold the request (a reference cycle that only the collector frees)."""
        error = ServingError.__new__(ServingError)
        Exception.__init__(error, self.message)
        error.code, error.message = self.code, self.message
        return error

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)


def status_code_from_int(value: int) -> grpc.StatusCode:
    """tf.errors.OpError.error_code and StatusProto.error_code use the gRPC numbering."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


class Malformed:
    """What a request deserializer hands a method for bytes that are not its request message."""

    def __init__(self, error: message.DecodeError) -> None:
        self.error = error


def parse_request(request_class):
    """A gRPC request deserializer that returns Malformed instead of raising: grpc would answer UNKNOWN and log a
    traceback for each such call."""
    def deserialize(data: bytes):
        try:
            return request_class.FromString(data)
        except message.DecodeError as e:
            return Malformed(e)
    return deserialize


async def reject_malformed(method: str, request, context: grpc.aio.ServicerContext) -> None:
    """INVALID_ARGUMENT, with what was wrong, for a request parse_request could not read."""
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"Malformed {method} request: the bytes are not its protobuf message ({request.error})")
