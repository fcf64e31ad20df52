"""Bounded load on loopback: 32 concurrent streams all complete, unmixed, each equal to offline `LLM.generate` with
its seed (continuous batching is batch-invariant); a client killed mid-stream frees its slot while the others go on.

Everything is bounded: short outputs from a tiny model, client timeouts, and polling loops with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams
from dgemma.server import ServerConfig, cli
from dgemma.server.metrics import parse_text
from helpers import make_tiny_checkpoint

N_REQUESTS = 32
SLOTS = 8
STEPS = 4  # max_denoising_steps per canvas: short requests
MAX_TOKENS = 24  # two canvases of 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("load") / "tiny", canvas_length=16)


@pytest.fixture(scope="module")
def server(ckpt):
    _, app = cli.build(ServerConfig(model=str(ckpt), max_num_seqs=SLOTS, max_waiting=64, max_model_len=512))
    with cli.BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(ckpt):
    return LLM(ckpt, max_num_seqs=SLOTS, max_model_len=512)


def prompt(i: int) -> str:
    return ["To be, or not", "The slings and arrows", "Whether 'tis nobler", "Ay, there's the rub"][i % 4] + f" {i}"


async def _stream(client: openai.AsyncOpenAI, i: int) -> tuple[int, str, str, set[str]]:
    stream = await client.completions.create(model=client.model_name, prompt=prompt(i), max_tokens=MAX_TOKENS,
                                             seed=1000 + i, stream=True, extra_body={"max_denoising_steps": STEPS})
    text, finish, ids = [], None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        for c in chunk.choices:
            text.append(c.text)
            finish = c.finish_reason or finish
    return i, "".join(text), finish, ids


def metrics(server) -> dict[str, float]:
    return parse_text(httpx.get(server.url + "/metrics", timeout=10).text)


def test_32_concurrent_streams_match_offline(server, offline):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=N_REQUESTS + 4)))
        client.model_name = server_model_name(server)
        try:
            return await asyncio.wait_for(asyncio.gather(*(_stream(client, i) for i in range(N_REQUESTS))), 120)
        finally:
            await client.close()

    before = metrics(server)
    results = asyncio.run(run())
    refs = offline.generate([prompt(i) for i in range(N_REQUESTS)],
                            [SamplingParams(max_new_tokens=MAX_TOKENS, seed=1000 + i, max_denoising_steps=STEPS)
                             for i in range(N_REQUESTS)])
    assert [r[0] for r in results] == list(range(N_REQUESTS))  # none lost
    assert len({next(iter(r[3])) for r in results}) == N_REQUESTS and all(len(r[3]) == 1 for r in results)
    for (i, text, finish, _), ref in zip(results, refs):
        assert text == ref.text, f"request {i} differs from offline generate with its seed"
        assert finish == ref.finish_reason
    after = metrics(server)
    done = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("dgemma_requests_finished_total"))
    assert done == N_REQUESTS
    assert after["dgemma_running_canvases"] == 0 and after["dgemma_requests_in_flight"] == 0


def server_model_name(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


KILLED_CLIENT = r"""
import json, socket, sys
port, stream = int(sys.argv[1]), sys.argv[2] == "stream"
body = json.dumps({"prompt": "To be", "max_tokens": 400, "stream": stream, "ignore_eos": True, "seed": 1,
                   "max_denoising_steps": 48, "stability_threshold": 0, "confidence_threshold": 0,
                   "dgemma": {"drafts": True}}).encode()
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n" % len(body) + body)
seen = b""
while stream and b"dgemma.draft" not in seen:  # it holds a slot and is denoising
    seen += s.recv(65536)
print("sent", flush=True)
sys.stdin.read()  # wait here until killed
"""


def wait_idle(server, timeout: float = 20) -> dict[str, float]:
    deadline, m = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["dgemma_running_canvases"] == 0 and m["dgemma_requests_in_flight"] == 0:
            break
        time.sleep(0.05)
    return m


def test_killed_client_frees_its_slot_and_others_are_unaffected(server, offline):
    before = metrics(server)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(server.port), "stream"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        assert metrics(server)["dgemma_running_canvases"] >= 1

        async def others():
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
            client.model_name = server_model_name(server)
            try:
                return await asyncio.gather(*(_stream(client, i) for i in range(3)))
            finally:
                await client.close()

        proc.kill()  # SIGKILL: the kernel closes its socket mid-stream
        proc.wait(10)
        results = asyncio.run(asyncio.wait_for(others(), 120))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    refs = offline.generate([prompt(i) for i in range(3)], [
        SamplingParams(max_new_tokens=MAX_TOKENS, seed=1000 + i, max_denoising_steps=STEPS) for i in range(3)])
    assert [r[1] for r in results] == [ref.text for ref in refs]
    # The killed request wanted 400 tokens at 48 steps a canvas (over a thousand forwards): it must have been
    # cancelled, not run to completion, and its slot must be free.
    m = wait_idle(server)
    cancelled = 'dgemma_requests_finished_total{finish_reason="cancelled"}'
    assert m[cancelled] - before.get(cancelled, 0) == 1
    assert m["dgemma_running_canvases"] == 0 and m["dgemma_queue_depth"] == 0
    assert m["dgemma_generation_tokens_total"] - before["dgemma_generation_tokens_total"] < 400 + 3 * MAX_TOKENS
    assert json.loads(httpx.get(server.url + "/health").text)["status"] == "ok"


def test_killed_non_streaming_client_frees_its_slot(server):
    before = metrics(server)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(server.port), "whole"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        deadline = time.monotonic() + 20
        while metrics(server)["dgemma_running_canvases"] < 1:  # admitted and denoising
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    m = wait_idle(server)
    cancelled = 'dgemma_requests_finished_total{finish_reason="cancelled"}'
    assert m[cancelled] - before.get(cancelled, 0) == 1 and m["dgemma_running_canvases"] == 0
