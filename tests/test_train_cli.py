"""`dgemma train` as a user meets it: everything is checked before the first step, errors are one line (one rank),
the export carries its tokenizer, `--help` shows every default, logs are readable, and `dgemma train plot` draws."""

import json

import pytest
from helpers import tiny_text_config

from dgemma.train.cli import build_parser
from dgemma.train.cli import main as train_main

CORPUS = ("A diffusion model denoises a canvas of tokens, block by block, and commits it. "
          "Then the next canvas begins from noise. ") * 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus file, tokenizer folder, config JSON): a tiny model and a BPE tokenizer that fits it."""
    from dgemma.tokenizer_train import save_tokenizer_dir, train_bpe_tokenizer
    root = tmp_path_factory.mktemp("corpus")
    text = root / "corpus.txt"
    text.write_text(CORPUS)
    tok = save_tokenizer_dir(train_bpe_tokenizer([text], vocab_size=300), root / "tok")
    config = {"model_type": "diffusion_gemma", "canvas_length": 8, "text_config": tiny_text_config(vocab_size=320)}
    return text, tok, json.dumps(config)


def base_args(corpus, out, steps=3, *extra):
    text, tok, config = corpus
    return ["--config", config, "--data", f"text:{text}", "--tokenizer", str(tok), "--out", str(out),
            "--steps", str(steps), "--batch-size", "2", "--data-arg", "window=24", "--no-progress",
            "--lr", "1e-3", "--log-every", "1", *extra]


def run(args, capsys):
    rc = train_main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- defect 5: validate everything before the first step ------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda a: _config(a, canvas_lenght=8), "canvas_lenght"),
    (lambda a: a + ["--data-arg", "windw=64"], "windw"),
    (lambda a: a + ["--data-arg", "window=abc"], "window"),
    (lambda a: a + ["--export-dtype", "float64x"], "float64x"),
    (lambda a: a + ["--lr", "-1e-3"], "lr"),
    (lambda a: a + ["--warmup", "-2"], "warmup"),
])
def test_bad_input_fails_before_the_first_step(corpus, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    rc, _, err = run(change(base_args(corpus, out)), capsys)
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "checkpoints").exists() and not (out / "final").exists()  # nothing ran


def _config(args, **extra):
    i = args.index("--config") + 1
    args[i] = json.dumps({**json.loads(args[i]), **extra})
    return args


def test_invalid_utf8_names_the_file(corpus, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(CORPUS.encode() + "caf\xe9".encode("latin-1") + CORPUS.encode())
    args = base_args(corpus, tmp_path / "run")
    args[args.index("--data") + 1] = f"text:{bad}"
    rc, _, err = run(args, capsys)
    assert rc == 2 and str(bad) in err and "UTF-8" in err and "Traceback" not in err


def test_only_rank_zero_reports_an_error(corpus, tmp_path, capsys, monkeypatch):
    args = base_args(corpus, tmp_path / "run") + ["--data-arg", "windw=64"]
    monkeypatch.setenv("RANK", "1")
    rc, out, err = run(args, capsys)
    assert rc == 2 and out == "" and err == ""
    monkeypatch.setenv("RANK", "0")
    rc, out, err = run(args, capsys)
    assert rc == 2 and "windw" in err


# -- defect 3: the export is usable as is ---------------------------------------------------------------------------
def test_final_carries_the_tokenizer_and_init_from_brings_its_own(corpus, tmp_path, capsys):
    from dgemma.cli import main as dgemma_main
    rc, _, _ = run(base_args(corpus, tmp_path / "a", 2), capsys)
    assert rc == 0
    final = tmp_path / "a/final"
    assert (final / "tokenizer.json").is_file() and (final / "tokenizer_config.json").is_file()
    assert dgemma_main(["generate", "--model", str(final), "a canvas", "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()  # text was generated, no --tokenizer anywhere
    # fine-tuning that export needs no --tokenizer: the folder has one
    text = corpus[0]
    rc, _, err = run(["--init-from", str(final), "--data", f"text:{text}", "--out", str(tmp_path / "b"),
                      "--steps", "1", "--batch-size", "2", "--data-arg", "window=24", "--no-progress"], capsys)
    assert rc == 0, err
    assert (tmp_path / "b/final/tokenizer.json").read_text() == (final / "tokenizer.json").read_text()


# -- --help ---------------------------------------------------------------------------------------------------------
def test_help_shows_every_default():
    parser = build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
    shown = 0
    for action in parser._actions:
        d = action.default
        if action.required or d is None or d is False or d == [] or d == "==SUPPRESS==" or action.dest == "resume":
            continue
        assert f"(default: {d})" in text, action.dest
        shown += 1
    assert shown >= 15 and "(default: 0.00015)" in text


def test_warmup_longer_than_the_run_is_flagged(corpus, tmp_path, capsys):
    rc, _, err = run(base_args(corpus, tmp_path / "run", 2, "--warmup", "10"), capsys)
    assert rc == 0 and "warm-up" in err and "10" in err


# -- logs -----------------------------------------------------------------------------------------------------------
def test_plain_log_lines_interval_means_and_summary(corpus, tmp_path, capsys):
    rc, out, _ = run(base_args(corpus, tmp_path / "run", 4, "--log-every", "2"), capsys)
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/4", "4/4"]
    assert all(k in lines[0] for k in ("loss", "lr", "ex/s", "eta"))
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["tokens"] > 0 and summary["wall_s"] > 0
    logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [2, 4] and all(x["steps_averaged"] == 2 for x in logged)


def test_plot_draws_the_loss_curves(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, _, _ = run(base_args(corpus, run_dir, 4, "--val-fraction", "0.2", "--eval-every", "2"), capsys)
    assert rc == 0
    assert train_main(["plot", str(run_dir)]) == 0
    png = run_dir / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    assert Image.open(png).size[0] >= 600
    rc, _, err = run(["plot", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "metrics.jsonl" in err


def test_report_to_tensorboard_without_the_package_is_a_clear_error(corpus, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    rc, _, err = run(base_args(corpus, tmp_path / "run", 2, "--report-to", "tensorboard"), capsys)
    assert rc == 2 and "pip install tensorboard" in err and not (tmp_path / "run").exists()
