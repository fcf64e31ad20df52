"""API fuzzing: schemathesis generates requests from the server's own OpenAPI schema and checks every answer.

Valid and invalid bodies (wrong types, out-of-range numbers, unknown fields, missing fields, non-JSON) go to every
endpoint of a live server on loopback. Each answer must be a 2xx or a 4xx (never a 5xx), with a status, content
type and body that the schema documents; an invalid request must be refused.

The property run is bounded for CI (DGEMMA_FUZZ_EXAMPLES examples per endpoint and mode, 40 by default: about
170 requests in ~10 s on one busy core). A longer run by hand, e.g. 500 per endpoint and mode:

    DGEMMA_FUZZ_EXAMPLES=500 python -m pytest -q -s tests/test_server_fuzz.py

prints the number of requests and their status codes at the end. Generation is kept short by a small context and
by clamping the per-request denoising steps (a valid request is still valid after the clamp).
"""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from dgemma.server import ServerConfig, cli
from dgemma.server.protocol import INT32
from helpers import make_tiny_checkpoint

EXAMPLES = int(os.environ.get("DGEMMA_FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
OUTCOMES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", canvas_length=16)
    _, app = cli.build(ServerConfig(model=str(ckpt), served_model_names=("tiny",), max_num_seqs=4, max_waiting=64,
                                    max_model_len=32, max_denoising_steps=2, max_body_bytes=64 * 1024))
    with cli.BackgroundServer(app) as srv:
        yield srv
    print(f"\nfuzz: {sum(OUTCOMES.values())} requests")
    for (op, status), n in sorted(OUTCOMES.items()):
        print(f"  {op}: {status} x {n}")


OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("GET", "/health"), ("GET", "/metrics")]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_schema_lists_every_operation(api_schema):
    ops = [op.ok() for op in api_schema.get_all_operations()]
    assert sorted((op.method.upper(), op.path) for op in ops) == sorted(OPERATIONS)


def shorten(body):
    """Keep valid step counts valid but small, so every request finishes in a few forwards."""
    if isinstance(body, dict):
        steps = body.get("max_denoising_steps")
        integral = isinstance(steps, int) or (isinstance(steps, float) and steps.is_integer())
        if integral and not isinstance(steps, bool) and 1 <= steps <= INT32:
            body["max_denoising_steps"] = min(steps, 2)


# A GET without parameters has no invalid input: those run in the positive mode only.
RUNS = [(m, p, mode) for m, p in OPERATIONS for mode in MODES if m == "POST" or mode is MODES[0]]


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {mode.value}" for m, p, mode in RUNS])
def test_every_answer_is_documented_and_never_a_server_error(api_schema, server, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        shorten(case.body)
        response = case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)
        OUTCOMES[f"{method} {path} {mode.value}", response.status_code] += 1
        assert response.status_code < 500

    run()
