"""`--language-model-only` (vLLM's name; `LLM(..., language_model_only=True)`): the vision tower is not read by the
loader, not counted by the memory plan, and image inputs are refused (ValueError offline, 400 from the server),
while text generation is what the full model gives."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
import torch
from vision_helpers import make_vlm_checkpoint, picture

from dgemma import LLM, SamplingParams, checkpoint
from dgemma import plan as plan_cli
from dgemma.cli import main as dgemma_main
from dgemma.server import ServerConfig, cli, memory
from dgemma.weight_file import WeightFile

pytest.importorskip("transformers")

P = SamplingParams(max_new_tokens=16, seed=3, max_denoising_steps=3, ignore_eos=True)
VISION_ROWS = {"vision tower weights", "vision tower activations", "vision temporaries reuse the forward's"}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return make_vlm_checkpoint(tmp_path_factory.mktemp("lmo") / "vlm")


def ask_image():
    buf = io.BytesIO()
    picture(20, 30, seed=1).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}]


def hand_count_released_tower() -> int:
    """Parameters of the released vision tower and its embedder, from its vision_config (hidden 1152, 27 layers,
    16 heads x 72, MLP 4,304, patch 16, 10,240 positions) and the text hidden size 2816."""
    h, inter, layers, head_dim, patch, positions, text_h = 1152, 4304, 27, 72, 16, 10_240, 2816
    per_layer = 4 * h * h + 2 * head_dim + 3 * h * inter + 4 * h  # q, k, v, o; q/k norms; MLP; four norms
    embedder = 2 * h + 2 * positions * h + 3 * patch * patch * h  # standardisation, 2-D position table, patches
    return layers * per_layer + embedder + text_h * h  # + the projection into the text model


def test_plan_without_the_tower_differs_by_exactly_its_bytes(capsys):
    """The released config in FP8 on 32 GiB at 8,192 tokens: with the tower it does not fit, text-only it does.
    The two plans differ only by the vision rows, the tower's weights are its hand-counted parameters x 2 bytes
    (bf16), and the totals differ by exactly the vision rows' sum (the KV pool is fixed: one 8k request)."""
    args = ["plan", "google/diffusiongemma-26B-A4B-it", "--quantization", "fp8", "--max-model-len", "8192",
            "--max-num-seqs", "1", "--gpu-memory-gib", "32", "--num-kv-blocks", "128", "--json"]
    codes, plans = [], []
    for extra in ([], ["--language-model-only"]):
        codes.append(dgemma_main(args + extra))
        plans.append(json.loads(capsys.readouterr().out))
    full, text = ({c["name"]: c["bytes"] for c in p["components"]} for p in plans)
    vision = {k: v for k, v in full.items() if k in VISION_ROWS}
    assert codes == [1, 0] and [p["fits"] for p in plans] == [False, True]
    assert [p["language_model_only"] for p in plans] == [False, True]
    assert set(vision) == VISION_ROWS and text == {k: v for k, v in full.items() if k not in VISION_ROWS}
    assert vision["vision tower weights"] == 2 * hand_count_released_tower() == 2 * 572_794_416
    assert plans[0]["total_bytes"] - plans[1]["total_bytes"] == sum(vision.values())
    assert plans[1]["total_bytes"] <= plans[1]["usable_bytes"] < plans[0]["total_bytes"]
    assert plans[1]["full_length_requests_fit"] == 1 and plans[0]["full_length_requests_fit"] == 0


def test_serve_plan_of_a_vision_checkpoint_drops_the_tower(vlm):
    """The start-up plan of `serve --language-model-only` (a checkpoint with a tower) has no vision rows, and is
    smaller by their sum."""
    kw = dict(dtype="float32", device="cpu", max_num_seqs=2, max_model_len=256, canvas_length=None, max_waiting=4)
    full = memory.check_checkpoint(vlm, **kw)
    text = memory.check_checkpoint(vlm, language_model_only=True, **kw)
    vision = {k: v for k, v in full.parts if k in VISION_ROWS}
    assert vision["vision tower weights"] > 0 and not VISION_ROWS & set(dict(text.parts))
    assert full.total - text.total == sum(vision.values())


def test_loader_never_reads_the_tower_and_text_generation_is_unchanged(vlm, monkeypatch, tmp_path):
    read = []
    original = WeightFile.read

    def spy(self, name, *a, **k):
        read.append(name)
        return original(self, name, *a, **k)

    monkeypatch.setattr(WeightFile, "read", spy)
    text_only = LLM(str(vlm), max_model_len=256, max_num_seqs=2, language_model_only=True)
    assert read and not [n for n in read if n.startswith(("model.encoder.vision_tower", "model.encoder.embed_vision"))]
    assert text_only.model.vision is None
    assert not [n for n, _ in text_only.model.named_parameters() if n.startswith("vision")]
    monkeypatch.setattr(WeightFile, "read", original)
    full = LLM(str(vlm), max_model_len=256, max_num_seqs=2)
    tower = {n: t for n, t in full.model.state_dict().items() if n.startswith("vision.")}
    assert tower and set(text_only.checkpoint.passthrough) >= {checkpoint.to_checkpoint_name(n) for n in tower}
    for prompt in ("To be, or not", [5, 17, 40, 2]):
        a, b = (llm.generate([prompt], P)[0] for llm in (full, text_only))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    chat = [{"role": "user", "content": "Hello there"}]
    assert text_only.chat(chat, P).token_ids == full.chat(chat, P).token_ids

    # a text-only model saves the tower it skipped (copied from the source files), so nothing is lost
    checkpoint.save(text_only.model, tmp_path / "again", passthrough=text_only.checkpoint.passthrough)
    again = checkpoint.load(tmp_path / "again")
    for n, t in tower.items():
        assert torch.equal(again.model.state_dict()[n], t), n


def test_images_are_refused_offline(vlm, capsys):
    llm = LLM(str(vlm), max_model_len=256, language_model_only=True)
    with pytest.raises(ValueError, match="language_model_only"):
        llm.chat(ask_image(), P)
    image = vlm.parent / "p.png"
    picture(20, 30).save(image)
    with pytest.raises(SystemExit) as e:
        dgemma_main(["generate", "Hi", "--model", str(vlm), "--chat", "--image", str(image), "--language-model-only"])
    assert e.value.code == 2 and "--language-model-only" in capsys.readouterr().err
    common = ["generate", "To be", "--model", str(vlm), "--max-new-tokens", "8", "--seed", "1",
              "--max-denoising-steps", "3", "--ignore-eos", "--json"]
    outs = []
    for extra in ([], ["--language-model-only"]):
        assert dgemma_main(common + extra) == 0
        outs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 8


def test_server_refuses_images_with_400_and_serves_text(vlm):
    args = cli.build_parser().parse_args([str(vlm), "--language-model-only", "--max-model-len", "256"])
    cfg = cli.config_from_args(args)
    assert cfg.language_model_only and not cli.config_from_args(cli.build_parser().parse_args([str(vlm)])) \
        .language_model_only
    llm, app = cli.build(cfg)
    assert llm.model.vision is None
    with cli.BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=cfg.model_name, messages=ask_image(), max_tokens=4)
        ok = c.chat.completions.create(model=cfg.model_name, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, extra_body={"max_denoising_steps": 2})
    err = e.value.body
    assert e.value.status_code == 400 and err["code"] == "images_not_supported"
    assert "--language-model-only" in err["message"] and err["param"] == "messages.0.content"
    assert ok.choices[0].message.content is not None and ok.usage.completion_tokens > 0


def test_flag_spelling():
    """vLLM spells it --language-model-only; dgemma's parsers also take --language_model_only."""
    for parser in (plan_cli.build_parser(), cli.build_parser()):
        base = ["m"] + (["--max-model-len", "8", "--gpu-memory-gib", "1"] if parser.prog == "dgemma plan" else [])
        assert parser.parse_args(base + ["--language_model_only"]).language_model_only
        assert not parser.parse_args(base).language_model_only
    assert ServerConfig().language_model_only is False
