"""Where users reach images offline: `LLM.chat` with image parts (PIL images, paths, bytes, data URLs) and
`dgemma generate --chat --image PATH`, with clear errors for bad images."""

import base64
import io
import json

import pytest
from vision_helpers import make_vlm_checkpoint, picture

from dgemma import LLM, SamplingParams
from dgemma import image_processing as ip
from dgemma.cli import main

pytest.importorskip("transformers")

P = dict(max_new_tokens=16, seed=3, max_denoising_steps=3, ignore_eos=True)


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    return make_vlm_checkpoint(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def llm(vlm_path):
    return LLM(str(vlm_path), max_model_len=512, max_num_seqs=2)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def ask(image_part, text="What is in the picture?"):
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


def test_chat_prompt_places_one_soft_token_run_per_image(llm):
    a, b = picture(40, 50, seed=1), picture(30, 90, seed=2)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": a},
                                         {"type": "text", "text": "with"}, {"type": "image", "image": b}]}]
    ids, images = llm.chat_inputs(msgs)
    cfg = llm.model.vision.cfg
    proc = ip.ImageProcessorConfig(cfg.patch_size, cfg.pooling_kernel_size, cfg.soft_tokens_per_image)
    counts = [ip.preprocess(a, proc).num_soft_tokens, ip.preprocess(b, proc).num_soft_tokens]
    assert images.counts == counts
    text = llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.count("<|image>") == 2 and text.count("<image|>") == 2 and text.count("<|image|>") == sum(counts)
    assert text.index("Compare") < text.index("<|image>") < text.index("with") < text.rindex("<|image>")


def test_every_image_source_gives_the_same_answer(llm, tmp_path):
    img = picture(45, 60, seed=5)
    data = png_bytes(img)
    (tmp_path / "p.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    parts = [{"type": "image", "image": img}, {"type": "image", "image": data},
             {"type": "image", "image": str(tmp_path / "p.png")}, {"type": "image", "path": tmp_path / "p.png"},
             {"type": "image_url", "image_url": {"url": url}}]
    outs = [llm.chat(ask(part), SamplingParams(**P)).token_ids for part in parts]
    assert all(o == outs[0] for o in outs) and len(outs[0]) == 16
    other = llm.chat(ask({"type": "image", "image": picture(45, 60, seed=6)}), SamplingParams(**P)).token_ids
    assert other != outs[0]  # the picture matters


def test_image_chat_does_not_depend_on_batch_mates(llm):
    msgs = ask({"type": "image", "image": picture(33, 47, seed=8)})
    alone = llm.chat(msgs, SamplingParams(**P)).token_ids
    ids, images = llm.chat_inputs(msgs)
    other = llm.engine.add_request(llm.encode("To be, or not"), SamplingParams(**P))
    rid = llm.engine.add_request(ids, SamplingParams(**P), images=images)
    done = {}
    while llm.engine.has_work():
        for ev in llm.engine.step():
            if ev.kind == "finished":
                done[ev.request_id] = ev.output
    assert done[rid].token_ids == alone and other in done


@pytest.mark.parametrize("case", ["corrupt", "format", "remote", "missing", "too_big"])
def test_bad_images_are_clear_errors(llm, tmp_path, case):
    if case == "corrupt":
        part, expect = {"type": "image", "image": png_bytes(picture(20, 20))[:60]}, "corrupt|decodable"
    elif case == "format":
        buf = io.BytesIO()
        picture(20, 20).save(buf, format="TIFF")
        part, expect = {"type": "image", "image": buf.getvalue()}, "unsupported image format TIFF"
    elif case == "remote":
        part, expect = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "remote"
    elif case == "missing":
        part, expect = {"type": "image", "path": str(tmp_path / "nope.png")}, "no such image file"
    else:
        part, expect = {"type": "image", "image": picture(20, 20)}, "over the limit"
    resolve = (lambda s: ip.open_source(s, max_pixels=100)) if case == "too_big" else None
    with pytest.raises(ip.ImageError, match=expect):
        llm.chat_inputs(ask(part), resolve=resolve)


def test_cli_generate_with_an_image(vlm_path, tmp_path, capsys, llm):
    img = picture(40, 60, seed=9)
    img.save(tmp_path / "a.png")
    assert main(["generate", "--model", str(vlm_path), "--chat", "--image", str(tmp_path / "a.png"),
                 "What is this?", "--max-new-tokens", "16", "--seed", "3", "--max-denoising-steps", "3",
                 "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is this?"}]}]
    ref = llm.chat(msgs, SamplingParams(**P))
    assert out["token_ids"] == ref.token_ids
    assert out["prompt_tokens"] == len(llm.chat_inputs(msgs)[0]) > 40


def test_cli_image_errors(vlm_path, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(vlm_path), "--chat", "--image", str(tmp_path / "bad.png"), "hi"])
    assert e.value.code == 2 and "bad.png: not a decodable image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--chat", "--image", str(tmp_path / "bad.png"), "hi"])  # the embedded text-only model
    assert e.value.code == 2 and "no vision tower" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(vlm_path), "--image", str(tmp_path / "bad.png"), "hi"])
    assert e.value.code == 2 and "--image needs --chat" in capsys.readouterr().err


def test_text_only_model_refuses_image_parts():
    llm = LLM()
    with pytest.raises(ValueError, match="no vision tower"):
        llm.chat_inputs(ask({"type": "image", "image": picture(10, 10)}))
