"""Errors over HTTP, one taxonomy for the node's app and the sidecar's (OpenAI's error shape,
``{"error": {message, type, param, code}}``):

- the client's mistakes -> 4xx with a message (a request the engine cannot take, an unknown
  model, a body that does not validate, a missing API key as 401, an operator's route without
  the operator key as 403, a full queue as 429);
- the server's faults -> 500: its configuration (``ConfigError``), a broken invariant
  (``RuntimeFault``) or anything unexpected, with an error id that the log shows beside the
  traceback; never plain text, never a traceback to the client.

``api_error_of`` is the one mapping, ``errors_middleware`` renders it for every route, and
``describe_validation_error`` is the one way a pydantic error is put in words (the CLI uses it too).
Loads neither TVM nor libp2p.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
from typing import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from node.api.clients import BODY_BUDGET, CLIENT, client_identity
from node.api.protocol import ErrorInfo, ErrorResponse
from node.api.server import json_response
from node.errors import ClientShareError, ConfigError, ContextLengthError, EngineBusyError, NoChatTemplateError, RequestError
from verify.grammar import GrammarError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a full queue drains within about a batch's worth of answers
BODY_TIMEOUT_S = 30.0  # a request body (at most 1 MiB) that takes longer to arrive is refused: 408

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error with its HTTP status and OpenAI fields; raised anywhere, rendered by the middleware."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code))

    def response(self) -> web.Response:
        return json_response(self.body(), status=self.status, headers=self.headers)


def describe_validation_error(exc: ValidationError, *, as_options: bool = False) -> tuple[str, str | None]:
    """Up to three of a pydantic error's problems in one line, and the first one's field
    (``as_options``: fields named as the CLI's ``--options``)."""
    problems = exc.errors()

    def field(loc: tuple) -> str:
        name = ".".join(map(str, loc)) or "body"
        return f"--{name.replace('_', '-')}" if as_options else name

    message = "; ".join(f"{field(p['loc'])}: {p['msg']}" for p in problems[:3])
    if len(problems) > 3:
        message += f" (and {len(problems) - 3} more)"
    first = problems[0]["loc"] if problems else ()
    return message, str(first[0]) if first else None


def api_error_of(exc: Exception, shutting_down: bool = False) -> APIError:
    """The one place exceptions become HTTP statuses (``node/errors.py``'s tree, aiohttp's, pydantic's)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineBusyError):
        status = 503 if shutting_down else 429
        code = "client_share_exceeded" if isinstance(exc, ClientShareError) else "server_busy"
        return APIError(status, str(exc), code=code, headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, NoChatTemplateError):
        return APIError(400, str(exc), param="model", code="no_chat_template")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc))
    if isinstance(exc, GrammarError):
        return APIError(400, f"the requested output format cannot be enforced: {exc}", code="unsupported_grammar")
    if isinstance(exc, ValidationError):
        message, param = describe_validation_error(exc)
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(exc, web.HTTPException):
        return APIError(exc.status, exc.text or exc.reason, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    error_id = secrets.token_hex(6)
    log.error("error %s: %s", error_id, "server configuration" if isinstance(exc, ConfigError) else "unexpected", exc_info=exc)
    return APIError(500, f"internal error {error_id}; the server logged the details under that id", code="internal_error")


def errors_middleware(shutting_down: Callable[[], bool] = lambda: False) -> Callable:
    """Middleware: every exception a handler raises becomes ``api_error_of``'s response."""

    @web.middleware
    async def render(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing escapes as a traceback
            return api_error_of(exc, shutting_down()).response()

    return render


def json_object(raw: bytes) -> dict:
    """A request body as a JSON object; 400 for anything else (not UTF-8, not JSON, nested so
    deep the parser gives up, not an object)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise APIError(400, "the body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


async def parse_body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as ``model``; 400 for anything that is not a valid JSON object of it.
    Parsed and validated on a worker thread: a 1 MiB body takes tens of milliseconds that the
    event loop owes to every other connection."""
    raw = await read_body(request)
    return await asyncio.to_thread(lambda: model.model_validate(json_object(raw)))  # ValidationError -> 400 in the middleware


async def read_body(request: web.Request) -> bytes:
    """The raw body, within ``BODY_TIMEOUT_S`` (a client trickling bytes cannot hold a handler);
    past ``client_max_size`` aiohttp raises 413; past its client's ``BodyBudget`` (where the app
    has one) 429, before anything parses it."""
    try:
        raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", code="request_timeout") from None
    except RequestPayloadError as exc:  # a body that does not decode as its Content-Encoding says, cut short, ...
        raise APIError(400, f"the request body cannot be read: {str(exc).strip()}", code="invalid_body") from None
    budget = request.app.get(BODY_BUDGET)
    if budget is not None and (wait := budget.take(request.get(CLIENT, ""), len(raw))):
        raise APIError(429, f"this client sends more than {budget.rate / 2**20:g} MiB of request bodies a second: "
                       "retry later", code="client_share_exceeded", headers={"Retry-After": str(math.ceil(wait))})
    return raw


HOLDS_API_KEY = web.RequestKey("holds_api_key", bool)
"""Set on every request: whether it may see what the /v1 routes show (no keys set, or a valid one
sent). The open status page (``GET /``) reads it to leave those parts out for everyone else."""

IS_OPERATOR = web.RequestKey("is_operator", bool)
"""Set on every request: whether it bears an operator key (``--operator-key``). The operator may
read what belongs to every client: any answer file, the receipts a node signed, a sidecar's
audits. Without operator keys nobody is the operator over HTTP; an API key never is (a key
shared by many clients must not let one read another's answers: issue 21, attack 11)."""


def require_api_key(api_keys: Sequence[str], operator_keys: Sequence[str] = ()) -> Callable:
    """Middleware: with keys set, every /v1 route needs ``Authorization: Bearer KEY`` (the node's and the sidecar's);
    an operator key counts as an API key too. Sets ``HOLDS_API_KEY``, ``IS_OPERATOR`` and the request's client
    (``node.api.clients.CLIENT``: the key it bears, else its address)."""
    keys, operators = list(api_keys), list(operator_keys)

    def matched(token: bytes | None, candidates: list[str]) -> str | None:
        # compare_digest against every key: no timing hint about which prefix matched
        hits = [k for k in candidates if token is not None and hmac.compare_digest(token, k.encode())]
        return hits[0] if hits else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        bearer = token.strip().encode() if scheme.lower() == "bearer" else None
        operator, key = matched(bearer, operators), matched(bearer, keys)
        request[IS_OPERATOR] = operator is not None
        request[HOLDS_API_KEY] = not keys or operator is not None or key is not None
        request[CLIENT] = client_identity(operator or key, request.remote)
        if not request[HOLDS_API_KEY] and request.path.startswith("/v1/"):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        return await handler(request)

    return check


def require_operator(request: web.Request, what: str) -> None:
    """403 unless the request bears an operator key; ``what``: what it asked for, in words."""
    if not request[IS_OPERATOR]:
        raise APIError(403, f"{what} is for the operator only (send Authorization: Bearer OPERATOR_KEY)", code="operator_only")


__all__ = ["APIError", "HOLDS_API_KEY", "IS_OPERATOR", "Handler", "api_error_of", "json_object", "read_body", "describe_validation_error",
           "errors_middleware", "parse_body", "require_api_key", "require_operator"]
