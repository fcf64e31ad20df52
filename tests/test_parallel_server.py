"""`dgemma serve --tensor-parallel-size 2` (rank 0 serves HTTP, a spawned rank follows its steps): the `openai`
client gets the same completions and chats as from the single-process server, and when the other rank dies the
server fails the request and exits non-zero with a clear error instead of hanging."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import make_tiny_checkpoint

from dgemma import checkpoint
from dgemma.parallel import free_port
from dgemma.server import ServerConfig, cli

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max-model-len", "128", "--max-num-seqs", "2", "--served-model-name", "tiny",
        "--diffusion-config", '{"max_denoising_steps": 12, "t_min": 0.3}']  # server-wide defaults reach every rank


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The tiny served checkpoint with a weak self-conditioning gain (0.1, as the parity tests): with it, two
    correct implementations agree to ~1e-5 over many steps and produce the same tokens."""
    base = make_tiny_checkpoint(tmp_path_factory.mktemp("tp-serve") / "base", canvas_length=16)
    ck = checkpoint.load(base)
    with torch.no_grad():
        ck.model.self_conditioning.down_proj.weight.mul_(0.1)
    out = checkpoint.save(ck.model, base.parent / "weak-sc", ck.generation)
    for f in base.iterdir():
        if not f.name.endswith(".safetensors") and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


def ask(url: str) -> list:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    out = []
    for seed in (0, 1):
        r = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=24, seed=seed,
                                      extra_body={"ignore_eos": True})
        out.append(r.choices[0].text)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Whether 'tis"}],
                                       max_tokens=16, seed=7)
    out.append(r.choices[0].message.content)
    return out


def start_server(ckpt: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", str(ckpt), "--port", str(port), *ARGS,
                             "--tensor-parallel-size", "2", *extra], env=env, stderr=subprocess.PIPE, text=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the tensor-parallel server did not come up")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_tensor_parallel_server_answers_like_one_process_and_dies_cleanly(ckpt):
    args = cli.build_parser().parse_args([str(ckpt), *ARGS])
    _, app = cli.build(cli.config_from_args(args))
    with cli.BackgroundServer(app) as srv:
        one = ask(srv.url)

    port = free_port()
    proc = start_server(ckpt, port, "--tp-timeout", "20")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        assert ask(url) == one
        assert all(one)

        # The other rank dies: the next request fails, and the server exits 1 saying why.
        (worker,) = [c for c in children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        os.kill(worker, signal.SIGKILL)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.APIError):
            client.completions.create(model="tiny", prompt="To be", max_tokens=16, seed=0)
        assert proc.wait(30) == 1
        err = proc.stderr.read()
        assert "tensor-parallel" in err and "rank died or did not answer" in err, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
