"""Stop strings while streaming: a stop string that spans two canvases never leaks its start into the stream.

The streamed text (every commit's and the final event's `text_delta`, concatenated) must equal the finished
output's text, for stop strings that start in one canvas and end in the next, and for tails that look like the
start of a stop string but never complete it.
"""

import pytest
from helpers import make_tiny_checkpoint

from dgemma.engine import stop_prefix_len
from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams

C = 16


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("stop") / "tiny", canvas_length=C), max_model_len=256)


def params(seed: int, stop=()) -> SamplingParams:
    return SamplingParams(max_new_tokens=3 * C, seed=seed, max_denoising_steps=4, ignore_eos=True, stop=stop)


def crossing_stops(llm, n: int = 3) -> list[tuple[int, str, int]]:
    """(seed, stop string, where it first starts) for stop strings that begin 2 characters before the end of the
    first canvas's text and end 2 characters into the second's."""
    found = []
    for seed in range(40):
        out = llm.generate("To be", params(seed))[0]
        b = len(llm.tokenizer.decode(out.token_ids[:C]))
        stop = out.text[b - 2:b + 2]
        if b >= 2 and len(stop) == 4 and out.text.find(stop) == b - 2 and "\ufffd" not in stop:
            found.append((seed, stop, b - 2))
        if len(found) == n:
            return found
    raise AssertionError("no seed gives a text to cut across a canvas boundary")


def streamed(llm, seed: int, stop) -> tuple[str, object]:
    text, final = "", None
    for ev in llm.stream("To be", params(seed, stop=stop)):
        if ev.kind in ("commit", "finished"):
            text += ev.text_delta
        final = ev.output or final
    return text, final


def test_stop_string_across_canvases_never_streams_its_start(llm):
    for seed, stop, at in crossing_stops(llm):
        whole = llm.generate("To be", params(seed, stop=(stop,)))[0]
        text, final = streamed(llm, seed, (stop,))
        assert whole.finish_reason == final.finish_reason == "stop"
        assert whole.text == final.text == text == llm.generate("To be", params(seed))[0].text[:at]


def test_held_tail_that_never_completes_is_released(llm):
    for seed, stop, at in crossing_stops(llm):
        never = stop[:2] + "\x00"  # the first canvas ends with the start of this stop string, which never follows
        whole = llm.generate("To be", params(seed, stop=(never,)))[0]
        text, final = streamed(llm, seed, (never,))
        assert whole.finish_reason == final.finish_reason == "length"
        assert text == final.text == whole.text == llm.generate("To be", params(seed))[0].text


def test_stop_prefix_len():
    assert stop_prefix_len("How never bc", ["bcpect"]) == 2
    assert stop_prefix_len("abc", ["abc"]) == 0  # a whole stop string is a hit, not a tail to hold
    assert stop_prefix_len("xaab", ["aabz", "bq"]) == 3
    assert stop_prefix_len("", ["ab"]) == 0 and stop_prefix_len("ab", []) == 0
