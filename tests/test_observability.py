"""Log formats, the Prometheus exposition, and the error mapping of the HTTP layer."""

from __future__ import annotations

import io
import json

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from livelm.daemon.http.errors import classify, error_body
from livelm.daemon.logs import get_logger, setup_logging
from livelm.daemon.metrics import Histogram, HttpMetrics, metric_name, render
from livelm.protocol.errors import (
    ContextFull,
    InternalError,
    InvalidRequest,
    Overloaded,
    TooLarge,
    Unauthorized,
    UnknownSession,
)


def test_json_lines_carry_extra_fields_and_tracebacks(log_stream: io.StringIO) -> None:
    setup_logging("info", "json", log_stream)
    log = get_logger("livelm.test")
    log.debug("hidden")
    log.info("hello %s", "world", extra={"session_id": "s1", "tokens": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in log_stream.getvalue().splitlines())
    assert first["msg"] == "hello world" and first["level"] == "info"
    assert first["logger"] == "livelm.test" and first["ts"].endswith("Z")
    assert first["session_id"] == "s1" and first["tokens"] == 3
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_text_lines(log_stream: io.StringIO) -> None:
    setup_logging("debug", "text", log_stream)
    get_logger("livelm.test").debug("step", extra={"batch": 4, "ops": {"a": 1}})
    line = log_stream.getvalue().strip()
    assert "DEBUG" in line and "livelm.test: step" in line
    assert 'batch=4 ops={"a":1}' in line


def test_exposition_format() -> None:
    http = HttpMetrics()
    http.observe("/v1/sessions/{id}/generate", "POST", 200, 0.5)
    http.observe("/v1/sessions/{id}/generate", "POST", 200, 0.25)
    http.observe("unmatched", "GET", 404, 0.001)
    text = render(http, {"sessions": 2, "kv free-blocks": 1.5, "bad": float("nan")}, ready=True)
    assert text.endswith("\n")
    assert (
        'livelm_http_requests_total{route="/v1/sessions/{id}/generate",method="POST",status="200"} 2'
        in text
    )
    assert (
        'livelm_http_request_seconds_total{route="/v1/sessions/{id}/generate",method="POST"} 0.75'
        in text
    )
    assert "# TYPE livelm_sessions gauge\nlivelm_sessions 2\n" in text
    assert "livelm_kv_free_blocks 1.5" in text and "livelm_bad NaN" in text
    assert "livelm_ready 1" in text
    assert http.count("unmatched", "GET", 404) == 1


def test_histogram_exposition_is_cumulative() -> None:
    histogram = Histogram("first_token_seconds", "first token", buckets=(0.01, 0.1, 1.0))
    for value in (0.004, 0.01, 0.05, 2.0):
        histogram.observe(value)
    text = render(HttpMetrics(), {}, ready=True, histograms=[histogram])
    lines = text[text.index("# HELP livelm_first_token_seconds"):].splitlines()
    assert lines == [
        "# HELP livelm_first_token_seconds first token",
        "# TYPE livelm_first_token_seconds histogram",
        'livelm_first_token_seconds_bucket{le="0.01"} 2',  # a bound's own value falls in it
        'livelm_first_token_seconds_bucket{le="0.1"} 3',
        'livelm_first_token_seconds_bucket{le="1"} 3',
        'livelm_first_token_seconds_bucket{le="+Inf"} 4',
        "livelm_first_token_seconds_sum 2.064",
        "livelm_first_token_seconds_count 4",
    ]


def test_metric_names_are_sanitized() -> None:
    assert metric_name("a.b-c") == "a_b_c"
    assert metric_name("1st") == "_1st"


@pytest.mark.parametrize(
    ("exc", "status", "code", "kind"),
    [
        (InvalidRequest("x"), 400, "invalid_request", "invalid_request_error"),
        (Unauthorized("x"), 401, "unauthorized", "authentication_error"),
        (UnknownSession("x"), 404, "unknown_session", "not_found_error"),
        (TooLarge("x"), 413, "too_large", "invalid_request_error"),
        (Overloaded("x"), 503, "overloaded", "overloaded_error"),
        (ContextFull("x"), 507, "context_full", "context_full_error"),
        (InternalError("x"), 500, "internal", "server_error"),
    ],
)
def test_livelm_errors_map_to_status_and_body(exc, status: int, code: str, kind: str) -> None:
    request = make_mocked_request("POST", "/v1/sessions/init")
    error = classify(exc, request)
    assert error.status == status
    body = json.loads(error_body(error, request.path))
    assert body == {"error": {"message": "x", "type": kind, "code": code}}


def test_overloaded_sets_retry_after() -> None:
    request = make_mocked_request("GET", "/")
    assert classify(Overloaded("busy", retry_after=2.2), request).headers == {"Retry-After": "3"}
    assert classify(Overloaded("busy"), request).headers == {"Retry-After": "1"}


def test_msgspec_and_aiohttp_errors() -> None:
    request = make_mocked_request("POST", "/v1/sessions/init")
    try:
        msgspec.json.decode(b'{"a": 1}', type=dict[str, str])
    except msgspec.ValidationError as exc:
        error = classify(exc, request)
    assert error.status == 400 and "Expected `str`, got `int`" in error.message
    too_large = classify(web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20), request)
    assert too_large.status == 413 and too_large.code.value == "too_large"


def test_unexpected_errors_do_not_leak() -> None:
    request = make_mocked_request("GET", "/v1/x")
    error = classify(RuntimeError("secret path /home/x"), request)
    assert error.status == 500 and error.message == "internal server error"


def test_anthropic_shape_under_v1_messages() -> None:
    request = make_mocked_request("POST", "/v1/messages")
    body = json.loads(error_body(classify(Overloaded("busy"), request), request.path))
    assert body == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
