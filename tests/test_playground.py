"""The playground page at GET /, driven in headless Chromium by Playwright: the canvas fills in step by step.

Needs the `playwright` Python package and a Chromium binary (Debian's `chromium` at /usr/bin/chromium; Playwright's
own browser download is not used). Skipped, saying why, when either is missing. The screenshot goes to the pytest
tmp dir and is copied to /work/scratch/playground.png when that folder can be made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dgemma.server import ServerConfig, cli
from helpers import make_tiny_checkpoint

CHROMIUM = os.environ.get("DGEMMA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCRATCH = Path("/work/scratch")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("play") / "tiny", canvas_length=16)
    _, app = cli.build(ServerConfig(model=str(ckpt), served_model_names=("tiny",), max_num_seqs=2,
                                    max_model_len=256))
    with cli.BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DGEMMA_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def open_playground(server, browser, height: int, prompt: str):
    """A page on the playground, its model listed, a completion prompt typed in."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.set_default_timeout(60_000)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#prompt", prompt)
    page.select_option("#mode", "completion")
    return page


def keep_screenshot(page, tmp_path, name: str, *earlier: str) -> None:
    """Screenshot the whole page into tmp_path/name (it must show something), and copy it with the `earlier` shots
    of the same test to SCRATCH for a person to look at."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    try:
        SCRATCH.mkdir(parents=True, exist_ok=True)
        for n in (name, *earlier):
            shutil.copy(tmp_path / n, SCRATCH / n)
    except OSError:
        pass  # a CI machine without /work: the copy under tmp_path is the record


def test_playground_shows_the_canvas_filling_in(server, browser, tmp_path):
    page = open_playground(server, browser, 860, "To be, or not to be, that is the question")
    # Knobs under which even random weights visibly converge: the temperature anneals from 1.0 to 0.02 over 8 steps,
    # so entropies fall and the entropy bound admits more and more positions as the canvas is denoised.
    knobs = {"max_tokens": "40", "seed": "4", "max_denoising_steps": "8", "entropy_bound": "4", "t_min": "0.02",
             "t_max": "1", "stability_threshold": "0", "confidence_threshold": "0", "delay": "60"}
    for knob, value in knobs.items():
        page.fill(f"#{knob}", value)
    page.click("#run")

    # Mid-run: a draft canvas is on screen, 16 token cells, every one drawn (whitespace and control bytes visibly).
    page.wait_for_function("window.dgemmaPlayground.drafts >= 7")
    cells = page.locator("#canvas .cell")
    assert cells.count() == 16
    assert all(cells.all_text_contents())
    assert page.locator("#canvas .cell.accepted").count() >= 1
    page.screenshot(path=str(tmp_path / "playground-mid.png"))

    page.wait_for_function("window.dgemmaPlayground.done && !window.dgemmaPlayground.running")
    state = page.evaluate("window.dgemmaPlayground")
    assert state["error"] is None
    assert state["finishReason"] in ("stop", "length")
    assert state["drafts"] == state["steps"] == len(state["trace"]) >= 8  # every step was rendered
    first_canvas = [accepted for canvas, _, accepted in state["trace"] if canvas == 0]
    assert len(first_canvas) == 8 and first_canvas[-1] > first_canvas[0]  # the canvas filled in step by step
    assert state["text"] and page.inner_text("#output") == state["text"]
    assert state["tokens"] >= 1 and float(page.inner_text("#s_tps")) > 0
    assert page.locator("#canvas .cell.committed").count() == 16  # the last canvas was committed
    keep_screenshot(page, tmp_path, "playground.png", "playground-mid.png")
    page.close()


def test_playground_page_and_assets_are_served(server):
    import httpx

    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "dgemma playground" in r.text
    for asset in ("playground.js", "playground.css"):
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200


def test_playground_marks_pinned_and_constrained_positions(server, browser, tmp_path):
    """A template request: the canvas shows the template's pinned tokens and the positions the constraint forces."""
    page = open_playground(server, browser, 900, "To be, or not to be")
    for knob, value in {"max_tokens": "32", "seed": "3", "max_denoising_steps": "4", "delay": "30"}.items():
        page.fill(f"#{knob}", value)
    page.select_option("#constraint_kind", "template")
    page.fill("#constraint", 'Q: {{len=3}} or {{regex="[0-9]{1,2}"}}!\n')
    page.click("#run")
    page.wait_for_function("window.dgemmaPlayground.done && !window.dgemmaPlayground.running")
    state = page.evaluate("window.dgemmaPlayground")
    assert state["error"] is None and state["finishReason"] == "stop", state
    first = state["marks"][0]
    # "Q: " and " or " are pinned (the len=3 hole fixes where the second starts); "!\n" after the regex is forced
    assert first["pinned"] >= 4 and first["forced"] >= 1, state["marks"]
    page.wait_for_timeout(50)
    assert page.locator("#canvas .cell.pinned").count() == first["pinned"] or state["canvases"] > 1
    keep_screenshot(page, tmp_path, "playground-template.png")
    page.close()
