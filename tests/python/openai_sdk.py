"""The official OpenAI Python SDK against the llm-resilience gateway.

Run by tests/gateway_python.rs, once per scenario, with the gateway's base URL
in GATEWAY_BASE_URL and its key in GATEWAY_API_KEY; the Rust test sets the
mock targets' faults before each run and counts the calls the SDK makes at
the gateway. Exits non-zero (an assertion or an unexpected exception) when
the SDK does not see what the scenario expects.

    python openai_sdk.py SCENARIO
"""

import json
import os
import sys

import openai
from openai import OpenAI

BASE_URL = os.environ["GATEWAY_BASE_URL"]
KEY = os.environ["GATEWAY_API_KEY"]
MESSAGES = [{"role": "user", "content": "Say hello"}]


def client(max_retries, key=KEY):
    return OpenAI(base_url=BASE_URL, api_key=key, max_retries=max_retries, timeout=30.0)


def expect(exc_type, status, call):
    """Runs `call`; it must raise exactly `exc_type` with `status`."""
    try:
        call()
    except exc_type as e:
        assert type(e) is exc_type, f"{type(e).__name__} is not {exc_type.__name__}"
        assert e.status_code == status, e.status_code
        body = e.body
        assert isinstance(body, dict), body
        for field in ("message", "type", "code"):
            assert isinstance(body.get(field), str) and body[field], (field, body)
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


def complete():
    r = client(0).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=16)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.content, r
    assert r.usage is not None and r.usage.total_tokens > 0, r


def stream():
    chunks = client(0).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for c in chunks:
        assert c.object == "chat.completion.chunk", c
        for choice in c.choices:
            text += choice.delta.content or ""
        usage = c.usage or usage
    assert text, "no text streamed"
    assert usage is not None and usage.total_tokens > 0


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tools():
    """A tool call, whole and streamed (pieces joined by index as the SDK's users do)."""
    c = client(0)
    r = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather", call
    assert "city" in json.loads(call.function.arguments), call
    calls = {}
    for chunk in c.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER], stream=True
    ):
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                got = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                got["id"] = piece.id or got["id"]
                if piece.function is not None:
                    got["name"] += piece.function.name or ""
                    got["arguments"] += piece.function.arguments or ""
    assert calls, "no tool call streamed"
    first = calls[min(calls)]
    assert first["id"] and first["name"] == "get_weather", first
    assert "city" in json.loads(first["arguments"]), first


def stream_broken():
    chunks = client(0).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    text = ""
    try:
        for c in chunks:
            for choice in c.choices:
                text += choice.delta.content or ""
    except openai.APIError as e:
        # The error event, typed: not a status error (the status was 200).
        assert not isinstance(e, openai.APIStatusError), type(e)
        assert e.body["code"] == "stream_interrupted", e.body
        assert e.body["type"] == "server_error", e.body
        assert text, "the chunks before the failure were not delivered"
        return
    raise AssertionError("a stream cut off upstream ended without an error")


def rate_limited():
    # Two retries, each after the gateway's Retry-After (counted by the test).
    e = expect(openai.RateLimitError, 429, lambda: client(2).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES))
    assert e.response.headers["retry-after"] == "2", e.response.headers
    assert e.body["type"] == "rate_limit_error", e.body


def rate_limited_long():
    # A Retry-After past the SDK's 2-minute cap: it gives up at once (the
    # test counts one call although max_retries is 2).
    e = expect(openai.RateLimitError, 429, lambda: client(2).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES))
    assert e.response.headers["retry-after"] == "300", e.response.headers


def rate_limited_stream():
    e = expect(openai.RateLimitError, 429, lambda: client(0).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert e.response.headers["retry-after"] == "2", e.response.headers


def unavailable():
    e = expect(openai.InternalServerError, 503, lambda: client(1).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES))
    assert e.body["code"] == "circuit_open", e.body
    assert e.response.headers["retry-after"] == "1", e.response.headers


def timeout():
    e = expect(openai.InternalServerError, 504, lambda: client(0).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES))
    assert e.body["type"] == "timeout", e.body


def bad_request():
    e = expect(openai.BadRequestError, 400, lambda: client(2).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES))
    assert e.body["reason"] == "context_length", e.body


def unauthorized():
    e = expect(openai.AuthenticationError, 401, lambda: client(2, key="sk-wrong").chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES))
    assert e.body["code"] == "invalid_api_key", e.body


def example():
    """The example gateway as the README runs it (`--mock`): answers come
    whole and streamed although its primary fails a fifth of its calls."""
    for _ in range(5):
        complete()
        stream()


SCENARIOS = {f.__name__: f for f in (
    complete, stream, tools, stream_broken, rate_limited, rate_limited_long,
    rate_limited_stream,
    unavailable, timeout, bad_request, unauthorized, example,
)}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
    print(f"ok {sys.argv[1]} (openai {openai.__version__})")
