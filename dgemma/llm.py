"""The offline API people already know: `LLM(model).generate(prompts, SamplingParams(...))`.

    from dgemma import LLM, SamplingParams
    llm = LLM("path/or/org/name")            # no argument: the embedded default model
    out = llm.generate(["To be, or not"], SamplingParams(max_new_tokens=128, seed=0))[0]
    print(out.text, out.steps_per_canvas, out.tokens_per_forward)

`LLM.stream(prompt, params)` yields `StreamEvent`s (per-step drafts when `trace=True`, then one per commit),
`LLM(model, tensor_parallel_size=2)` splits the model over two processes (parallel.py, docs/parallel.md; guard the
script's entry point with `if __name__ == "__main__":`, as the other ranks are spawned), and
`LLM(model, quantization="fp8")` holds the weights in FP8, quantised as they load (fp8.py); a compressed-tensors
FP8 checkpoint loads in FP8 by itself. `LLM.chat(messages, params)` renders the checkpoint's chat template first;
its messages may hold images (`{"type": "image", "image": PIL image | bytes | path}`) when the checkpoint has a
vision tower. `LLM(model, language_model_only=True)` (vLLM's name) loads the text model alone: the vision tower is
not read, and image inputs are refused with a ValueError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import checkpoint
from .engine import Engine, EngineConfig
from .outputs import RequestOutput, StreamEvent
from .sampling_params import SamplingParams

Prompt = str | list[int]
TEXT_ONLY_REFUSAL = ("image inputs are disabled: the model was loaded with language_model_only "
                     "(--language-model-only), so its vision tower is not loaded")


def default_model_path() -> Path:
    """The small model shipped inside the package (trained by dgemma on Tiny Shakespeare)."""
    return Path(__file__).parent / "assets" / "shakespeare"


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype | None = None,
                 device: str = "cpu", max_num_seqs: int = 8, max_model_len: int | None = None,
                 canvas_length: int | None = None, max_denoising_steps: int | None = None,
                 logits_budget_bytes: int = 512 * 2**20, batch_invariant: bool | None = None,
                 compile: bool | None = None, quantization: str | None = None, block_size: int = 64,
                 num_kv_blocks: int | None = None, enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int | None = None, language_model_only: bool = False,
                 tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 tp_timeout_s: float | None = None):
        path = checkpoint.resolve(model) if model is not None else default_model_path()
        self.tp = None
        if tensor_parallel_size != 1 or enable_expert_parallel:  # [parallel] docs/parallel.md
            from . import parallel, parallel_engine

            pcfg = parallel.ParallelConfig(tensor_parallel_size, enable_expert_parallel,
                                           tp_timeout_s or parallel.DEFAULT_TIMEOUT_S)
            if quantization == "fp8":
                raise ValueError("tensor parallelism does not take FP8 weights yet: drop --quantization fp8")
            from .config import ModelConfig
            parallel.check_divisible(ModelConfig.from_file(path / "config.json").text, tensor_parallel_size,
                                     enable_expert_parallel)
            kwargs = dict(model=str(path), dtype=dtype, device=device, max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len, canvas_length=canvas_length,
                          max_denoising_steps=max_denoising_steps, logits_budget_bytes=logits_budget_bytes,
                          batch_invariant=batch_invariant, compile=compile, tensor_parallel_size=tensor_parallel_size,
                          enable_expert_parallel=enable_expert_parallel, tp_timeout_s=pcfg.timeout_s,
                          block_size=block_size, num_kv_blocks=num_kv_blocks,
                          enable_prefix_caching=enable_prefix_caching,
                          max_num_batched_tokens=max_num_batched_tokens, language_model_only=language_model_only)
            self.tp = parallel_engine.start(pcfg, device, kwargs)
            device = str(self.tp.device)
        ck = checkpoint.load(path, dtype=dtype, device=device, quantization=quantization,
                             language_model_only=language_model_only, tp=self.tp)
        self.language_model_only = bool(language_model_only)
        if canvas_length is not None and canvas_length != ck.config.canvas_length:
            ck.model.config = ck.config = ck.config.with_canvas_length(canvas_length)
        self.checkpoint, self.model, self.config = ck, ck.model, ck.config
        self.generation = ck.generation
        if max_denoising_steps is not None:
            from dataclasses import replace
            self.generation = replace(self.generation, max_denoising_steps=max_denoising_steps)
        self.tokenizer = None
        if (path / "tokenizer.json").is_file():
            from .tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_dir(path)
        eos = set(ck.config.eos_token_ids) | set(ck.generation.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        t = ck.config.text
        max_len = max_model_len or min(t.max_position_embeddings, 8192)
        engine_cls, extra = Engine, {}
        if self.tp is not None:
            from .parallel_engine import LeaderEngine
            engine_cls, extra = (LeaderEngine, {"tp": self.tp}) if self.tp.leader else (Engine, {})
        self.engine = engine_cls(self.model, eos_token_ids=sorted(eos), pad_token_id=ck.generation.pad_token_id,
                                 defaults=self.generation, tokenizer=self.tokenizer,
                                 config=EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_len,
                                                     logits_budget_bytes=logits_budget_bytes,
                                                     batch_invariant=batch_invariant, compile=compile,
                                                     block_size=block_size, num_kv_blocks=num_kv_blocks,
                                                     enable_prefix_caching=enable_prefix_caching,
                                                     max_num_batched_tokens=max_num_batched_tokens),
                                 **extra)
        if self.tp is not None:
            from . import parallel_engine
            self.tp.ready()  # every rank has its shard
            if not self.tp.leader:  # a follower rank: serve the leader's steps, then leave the process
                parallel_engine.run_follower(self.engine, self.tp)
            parallel_engine.register_exit(self.close)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and leave the group (also done at exit); a no-op without TP."""
        if self.tp is not None:
            from . import parallel_engine
            tp, self.tp = self.tp, None
            parallel_engine.close(self.engine, tp)

    # -- prompts -------------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def chat_prompt(self, messages: list[dict], **template_kwargs) -> list[int]:
        return self.chat_inputs(messages, **template_kwargs)[0]

    def chat_inputs(self, messages: list[dict], resolve=None, **template_kwargs):
        """(prompt ids, images or None) of a chat whose messages may hold image parts: {"type": "image", "image":
        PIL image | bytes | path} or {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: chat needs tokenizer.json and a chat template")
        from .image_processing import split_chat_images
        from .vision_prompt import chat_inputs

        if self.language_model_only and split_chat_images(messages)[1]:
            raise ValueError(TEXT_ONLY_REFUSAL)
        return chat_inputs(self.tokenizer, self.model.vision, messages, resolve=resolve, **template_kwargs)

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(plist)
        if len(params) != len(plist):
            raise ValueError(f"got {len(plist)} prompts but {len(params)} SamplingParams")
        return self.engine.run([(self.encode(p), sp) for p, sp in zip(plist, params)])

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **template_kwargs) -> RequestOutput:
        """One chat turn; messages may hold image parts (see chat_inputs)."""
        ids, images = self.chat_inputs(messages, **template_kwargs)
        for ev in self.stream(ids, params, images=images):
            if ev.kind == "finished":
                return ev.output

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, images=None) -> Iterator[StreamEvent]:
        """Events of one request as they happen. Other queued requests keep running alongside. `images`: the
        prompt's `vision_prompt.PromptImages` (from `chat_inputs`), if any."""
        rid = self.engine.add_request(self.encode(prompt), params, images=images)
        try:
            while True:
                for ev in self.engine.step():
                    if ev.request_id == rid:
                        yield ev
                        if ev.kind == "finished":
                            return
        finally:
            self.engine.abort(rid)
