"""`dgemma serve` with images: the `openai` client sends an image_url part (stream and non-stream) and gets what
offline `LLM.chat` gives; every bad image gets a 400 that says what is wrong; file:// only under
--allowed-local-media-path; http(s) refused unless allowed."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
from vision_helpers import make_vlm_checkpoint, picture

from dgemma import image_processing as ip
from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams
from dgemma.server import ServerConfig, cli
from dgemma.server.media import MediaPolicy

pytest.importorskip("transformers")

FAST = {"max_denoising_steps": 3}
MAX_LEN = 256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_vlm_checkpoint(tmp_path_factory.mktemp("vserve") / "vlm")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    picture(40, 50, seed=4).save(d / "ok.png")
    return d


@pytest.fixture(scope="module")
def server(ckpt, media_dir):
    cfg = ServerConfig(model=str(ckpt), served_model_names=("vlm",), max_num_seqs=2, max_model_len=MAX_LEN,
                       media=MediaPolicy(allowed_local_media_path=str(media_dir), max_images_per_request=2,
                                         max_image_pixels=200_000))
    llm, app = cli.build(cfg)
    with cli.BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(ckpt):
    return LLM(ckpt, max_num_seqs=2, max_model_len=MAX_LEN)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def message(url: str, text: str = "What is this?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_image_chat_equals_offline(client, offline, stream):
    img = picture(45, 60, seed=stream)
    kw = dict(model="vlm", messages=message(data_url(img)), max_tokens=16, seed=5, extra_body=FAST)
    ref = offline.chat([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                     {"type": "image", "image": img}]}],
                       SamplingParams(max_new_tokens=16, seed=5, **FAST))
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    else:
        r = client.chat.completions.create(**kw)
        text = r.choices[0].message.content
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids) > 40  # the image's soft tokens are counted
    assert text == ref.text


def test_local_file_under_the_allowed_folder(client, offline, media_dir):
    r = client.chat.completions.create(model="vlm", messages=message(f"file://{media_dir / 'ok.png'}"),
                                       max_tokens=8, seed=1, extra_body=FAST)
    ref = offline.chat([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                     {"type": "image", "path": media_dir / "ok.png"}]}],
                       SamplingParams(max_new_tokens=8, seed=1, **FAST))
    assert r.choices[0].message.content == ref.text


def bad_cases(media_dir, tmp_path):
    outside = tmp_path / "outside.png"
    picture(20, 20).save(outside)
    (media_dir / "link.png").unlink(missing_ok=True)
    (media_dir / "link.png").symlink_to(outside)
    tiff = io.BytesIO()
    picture(20, 20).save(tiff, format="TIFF")
    good = data_url(picture(20, 20))
    return {
        "corrupt": (message("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()),
                    "invalid_image", "decodable"),
        "bad-base64": (message("data:image/png;base64,@@@"), "invalid_image", "base64"),
        "unsupported-format": (message("data:image/tiff;base64," + base64.b64encode(tiff.getvalue()).decode()),
                               "unsupported_image_format", "TIFF"),
        "not-an-image": (message("data:text/plain;base64,aGk="), "unsupported_image_format", "not an image"),
        "too-many": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good}}] * 3}],
                     "too_many_images", "at most 2"),
        "over-pixel-limit": (message(data_url(picture(500, 500))), "image_too_large", "over the limit"),
        "remote": (message("https://example.com/cat.png"), "image_url_not_allowed", "--allow-remote-media"),
        "file-outside": (message(f"file://{outside}"), "image_url_not_allowed", "inside the allowed media folder"),
        "symlink-escape": (message(f"file://{media_dir / 'link.png'}"), "image_url_not_allowed", "inside"),
        "file-missing": (message(f"file://{media_dir / 'nope.png'}"), "invalid_image", "no such image file"),
    }


CASES = ["corrupt", "bad-base64", "unsupported-format", "not-an-image", "too-many", "over-pixel-limit", "remote",
         "file-outside", "symlink-escape", "file-missing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_images_get_a_400_that_says_why(client, media_dir, tmp_path, case):
    messages, code, words = bad_cases(media_dir, tmp_path)[case]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="vlm", messages=messages, max_tokens=4, extra_body=FAST)
    err = e.value.body
    assert e.value.status_code == 400 and err["code"] == code and words in err["message"], err
    assert err["param"].startswith("messages")


def test_text_only_server_refuses_images(tmp_path):
    from helpers import make_tiny_checkpoint

    cfg = ServerConfig(model=str(make_tiny_checkpoint(tmp_path / "t")), max_model_len=64)
    _, app = cli.build(cfg)
    with cli.BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=cfg.model_name, messages=message(data_url(picture(9, 9))), max_tokens=4)
    assert e.value.body["code"] == "images_not_supported" and e.value.body["param"] == "messages.0.content"


def test_media_flags_make_the_policy(tmp_path):
    args = cli.build_parser().parse_args(["m", "--allowed-local-media-path", str(tmp_path), "--allow-remote-media",
                                          "--max-images-per-request", "3"])
    policy = cli.config_from_args(args).media
    assert policy == MediaPolicy(allowed_local_media_path=str(tmp_path), allow_remote_media=True,
                                 max_images_per_request=3)
    with pytest.raises(ValueError, match="not a folder"):
        MediaPolicy(allowed_local_media_path=str(tmp_path / "nope"))
    assert ip.decode_data_url("data:image/png;base64,aGk=") == b"hi"


def test_remote_urls_are_fetched_only_when_allowed(media_dir):
    """A loopback HTTP server stands in for the network."""
    import functools
    import http.server
    import threading

    from dgemma.server.media import resolver

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/ok.png"
    try:
        img = resolver(MediaPolicy(allow_remote_media=True))(url)
        assert img.size == (50, 40)
        with pytest.raises(PermissionError):
            resolver(MediaPolicy())(url)
        with pytest.raises(ip.ImageError, match="over the limit"):
            resolver(MediaPolicy(allow_remote_media=True, max_image_bytes=100))(url)
    finally:
        httpd.shutdown()


PLAYGROUND_HARNESS = r"""
// Runs playground.js in node with a stub DOM: an image file is chosen, "run" is clicked, and the request body the
// page would POST is printed (fetch is stubbed to record it).
const fs = require("fs"), vm = require("vm");
const [js, imagePath] = process.argv.slice(2);
const els = {};
const el = (id) => els[id] || (els[id] = { id, value: "", textContent: "", disabled: false, files: [],
  replaceChildren() {}, addEventListener() {}, appendChild() {}, classList: { add() {}, remove() {} }, style: {} });
let posted = null;
const ctx = {
  window: {}, console, performance: { now: () => 0 }, setTimeout, TextDecoder, JSON, Promise, Object, Set, Error,
  document: { getElementById: el, createElement: () => el("x" + Math.random()) },
  FileReader: class { readAsDataURL(f) { this.result = "data:" + f.type + ";base64," + f.bytes.toString("base64");
    setTimeout(() => this.onload(), 0); } },
  AbortController: class { constructor() { this.signal = {}; } abort() {} },
  fetch: async (url, opts) => { if (opts && opts.body) posted = { url, body: JSON.parse(opts.body) };
    return { ok: false, statusText: "stub", json: async () => ({ error: { message: "stub" } }) }; },
};
vm.createContext(ctx);
el("mode").value = "chat"; el("prompt").value = "What is this?"; el("max_tokens").value = "8"; el("seed").value = "2";
el("image").files = [{ type: "image/png", bytes: fs.readFileSync(imagePath) }];
vm.runInContext(fs.readFileSync(js, "utf8"), ctx);
vm.runInContext("run()", ctx).then(() => process.stdout.write(JSON.stringify(posted)));
"""


def test_playground_sends_an_uploaded_image_that_the_server_accepts(server, offline, tmp_path):
    """The playground's image upload, run in node: the body it builds, sent to the server, gives the offline answer."""
    import shutil
    import subprocess
    from pathlib import Path

    import httpx

    node = shutil.which("node")
    if node is None:  # the browser test (test_playground.py) covers the page where node is missing
        pytest.skip("node is not installed")
    img = picture(30, 40, seed=12)
    img.save(tmp_path / "up.png")
    (tmp_path / "h.js").write_text(PLAYGROUND_HARNESS)
    js = Path(__file__).parent.parent / "dgemma" / "server" / "static" / "playground.js"
    r = subprocess.run([node, str(tmp_path / "h.js"), str(js), str(tmp_path / "up.png")], capture_output=True,
                       text=True, timeout=60)
    posted = json.loads(r.stdout)
    assert posted["url"] == "/v1/chat/completions"
    parts = posted["body"]["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    body = dict(posted["body"], stream=False, max_denoising_steps=3)
    body.pop("stream_options")
    body.pop("dgemma")
    got = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    ref = offline.chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                     {"type": "text", "text": "What is this?"}]}],
                       SamplingParams(max_new_tokens=8, seed=2, **FAST))
    assert got["choices"][0]["message"]["content"] == ref.text
