"""The `dgemma` command: help, generate, and one-line errors for the usual mistakes."""

import json
import os
import subprocess
import sys

import pytest
from helpers import make_tiny_checkpoint

from dgemma import checkpoint
from dgemma.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), canvas_length=16)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dgemma.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_no_arguments_prints_help():
    r = run_cli()
    assert r.returncode == 0 and "usage: dgemma" in r.stdout and "generate" in r.stdout


def test_generate_json(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "To be", "--max_new_tokens", "20", "--seed", "3",
                 "--max-denoising-steps", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion_tokens"] <= 20 and out["finish_reason"] in ("stop", "length")
    assert out["decoder_forwards"] == sum(out["steps_per_canvas"]) and max(out["steps_per_canvas"]) <= 4


def test_generate_trace_gif(ckpt, tmp_path, capsys):
    gif = tmp_path / "t.gif"
    assert main(["generate", "--model", str(ckpt), "To be", "--max-new-tokens", "16", "--seed", "1",
                 "--max-denoising-steps", "3", "--ignore-eos", "--trace-out", str(gif)]) == 0
    from PIL import Image

    img = Image.open(gif)
    assert img.n_frames >= 2 and img.size[0] > 100


@pytest.mark.parametrize("case", ["missing", "corrupt", "foreign", "hub_offline"])
def test_friendly_errors(case, ckpt, tmp_path):
    env = {}
    if case == "missing":
        model, expect = str(tmp_path / "nope"), "no such folder"
    elif case == "corrupt":
        model = tmp_path / "c"
        checkpoint.save(checkpoint.load(ckpt).model, model)
        f = model / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        model, expect = str(model), "model.safetensors"
    elif case == "foreign":
        model = tmp_path / "f"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
        model, expect = str(model), "model_type' must be 'diffusion_gemma'"
    else:
        model, expect = "google/diffusiongemma-26B-A4B-it", "cannot fetch from the Hugging Face Hub"
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = run_cli("generate", "--model", model, "hello", env=env)
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("dgemma: error:") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_hub_id_resolves_from_local_cache_offline(ckpt, tmp_path, monkeypatch):
    """The Hub code path is real: a snapshot in the local HF cache resolves with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-dg" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--acme--tiny-dg" / "refs").mkdir()
    (cache / "models--acme--tiny-dg" / "refs" / "main").write_text(snap.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    path = checkpoint.resolve("acme/tiny-dg")
    assert path.resolve() == snap.resolve()
    assert checkpoint.load(path).config.canvas_length == 16


# MARK: hardening (issue 12): each of these failed before its fix


def test_help_does_not_import_torch():
    code = ("import sys; from dgemma.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['serve', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("NO-TORCH"), r.stdout[-300:] + r.stderr[-300:]
    assert "usage: dgemma serve" in r.stdout and "--allowed-hosts" in r.stdout


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_device_without_cuda_is_a_one_line_error(ckpt, device, monkeypatch, capsys):
    import torch

    from dgemma.server import cli as serve_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ckpt), "--device", device, "hi"])
    assert e.value.code == 2
    assert serve_cli.main(["serve", str(ckpt), "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in "".join(err)
    assert err[0].startswith("dgemma: error: --device") and err[1].startswith("dgemma serve: error: --device")
    assert all("CUDA is not available" in line and "--device cpu" in line for line in err)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(ckpt), "--device", "gpu0", "hi"])
    assert "is not a device name" in capsys.readouterr().err


def test_json_with_show_canvas_keeps_stdout_json(ckpt):
    r = run_cli("generate", "--model", str(ckpt), "To be", "--max-new-tokens", "16", "--seed", "1",
                "--max-denoising-steps", "3", "--json", "--show-canvas")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout is a pipe here: the live view must not be in it
    assert out["completion_tokens"] >= 1 and "canvas" in r.stderr


def test_trace_out_says_where_it_wrote(ckpt, tmp_path, capsys):
    for target in (tmp_path / "t.gif", tmp_path / "frames"):
        assert main(["generate", "--model", str(ckpt), "To be", "--max-new-tokens", "16", "--seed", "1",
                     "--max-denoising-steps", "3", "--trace-out", str(target)]) == 0
        err = capsys.readouterr().err
        assert "wrote the denoising trace" in err and str(target) in err and target.exists()


def test_serve_on_a_busy_port_fails_at_once(ckpt):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run_cli("serve", str(ckpt), "--port", str(port))
    assert r.returncode == 1
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert lines == [f"dgemma serve: error: cannot listen on 127.0.0.1:{port}: Address already in use (another "
                     "process is listening there: stop it or pick another --port)"], r.stderr
    assert "startup complete" not in r.stderr + r.stdout


def test_serve_says_where_it_listens_and_serves(ckpt):
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", str(ckpt), "--port", "0",
                             "--max-model-len", "64", "--log-level", "warning"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()  # the first line: the URL (the port was 0: the OS chose one)
        assert line.startswith("dgemma serve: serving ") and "http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split(" ")[0]
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)


def test_engine_mode_flags_reach_the_engine(ckpt, capsys):
    """`--no-batch-invariant` runs the fast step (the same tokens as the Python API in fast mode, which differ from
    exact mode's: the two modes draw differently), `--batch-invariant` the exact one; `serve` takes both flags."""
    from dgemma.llm import LLM
    from dgemma.sampling_params import SamplingParams
    from dgemma.server.cli import build_parser, config_from_args

    sp = SamplingParams(max_new_tokens=32, seed=3, max_denoising_steps=4)
    want = {bi: LLM(ckpt, batch_invariant=bi).generate("To be", sp)[0].token_ids for bi in (True, False)}
    assert want[True] != want[False]
    for flag, bi in (("--batch-invariant", True), ("--no-batch-invariant", False)):
        assert main(["generate", "--model", str(ckpt), "To be", "--max-new-tokens", "32", "--seed", "3",
                     "--max-denoising-steps", "4", "--json", flag]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == want[bi], flag
    cfg = config_from_args(build_parser().parse_args(["--no-batch-invariant", "--compile"]))
    assert cfg.batch_invariant is False and cfg.compile is True
    assert config_from_args(build_parser().parse_args([])).batch_invariant is None
