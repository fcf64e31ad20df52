"""OpenAI wire format: pydantic request/response models, and the mapping of request fields to `SamplingParams`.

Requests are validated strictly (`strict=True`: "5" is not an int, true is not a number) and unknown fields are
refused (`extra="forbid"`): a misspelt knob must not be silently ignored. OpenAI features dgemma does not implement
(`logprobs`, `logit_bias`, `tools`, `n` > 1, penalties, ...) are declared so that
`unsupported()` can answer 400 naming the field instead of a generic "extra field" error.

Field mapping: `max_completion_tokens` / `max_tokens` -> max_new_tokens (absent: the room left in max_model_len, not
the checkpoint's 256), `seed`, `stop`, `top_k`, `top_p`. DiffusionGemma extras, sent as extra body fields:
`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`,
`ignore_eos`, `stop_token_ids`, and `"dgemma": {"drafts": true}` (stream the draft canvas of every denoising step).
`temperature` is accepted (0..2) but has no effect: the denoising schedule anneals from t_max to t_min over the steps
of each canvas, so set `t_min`/`t_max` instead.

Structured output (docs/constrained.md): OpenAI's `response_format` (`text`, `json_object`, or `json_schema` with
`{"name", "schema", "strict"}`; the schema is always enforced, strict or not), vLLM's `structured_outputs`
(`{"json", "regex", "choice", "grammar"}`, the grammar in Lark) and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`; and dgemma's infilling template (dgemma/template.py) as
`structured_outputs.template` or `guided_template`.
At most one constraint per request; an invalid one is a 400 that names the field and says why.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from ..sampling_params import SamplingParams


class RequestError(ValueError):
    """A client error, answered with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}


# -- requests ----------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _integral(v: Any) -> Any:
    """JSON has one number type: 3.0 is the integer 3 (as JSON Schema says), while 3.5, "3" and true are not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _only(schema: dict) -> WithJsonSchema:
    """The published schema of a field declared to be refused by name: just the values dgemma accepts, or null."""
    return WithJsonSchema({"anyOf": [schema, {"type": "null"}]})


def Int(**bounds: int) -> Any:  # noqa: N802 - a type
    """An int field (bounds as in Field: ge, le, lt) that also takes integral floats."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


INT32 = 2**31 - 1  # fields the engine keeps in int32 tensors
TokenId = Seed = Int(ge=0, lt=2**63)
Count = Int(ge=1, le=INT32)  # max_tokens, max_denoising_steps
TopK = Int(ge=-1, le=INT32)
Steps = Int(ge=0, le=INT32)  # stability_threshold
AnyInt = Int()
MAX_STOPS, MAX_STOP_CHARS = 16, 1024  # streaming holds back tails of stop strings: keep that check cheap
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
_TOKEN = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
_TEXT_PARTS = {"type": "array", "items": {"type": "object", "properties": {"type": {"const": "text"},
                                                                          "text": {"type": "string"}},
                                          "required": ["type", "text"]}}


class StreamOptions(_Strict):
    include_usage: bool = False


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra field (the kinds dgemma implements; `grammar` is Lark text), plus dgemma's
    `template` (fixed text and holes, dgemma/template.py)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    template: str | None = None


class DgemmaOptions(_Strict):
    drafts: bool = False  # stream "dgemma.draft" events: the argmax canvas and accepted mask at every step


class _Common(_Strict):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # accepted, no effect: see the module docstring
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: TopK | None = None
    user: str | None = None
    # DiffusionGemma extras
    max_denoising_steps: Count | None = None
    entropy_bound: float | None = Field(None, gt=0)
    t_min: float | None = Field(None, ge=0)
    t_max: float | None = Field(None, ge=0)
    stability_threshold: Steps | None = None
    confidence_threshold: float | None = Field(None, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    dgemma: DgemmaOptions | None = None
    # declared only to be refused by name (see `unsupported`); the schema shows the values that are accepted
    n: Annotated[AnyInt | None, _only({"const": 1})] = None
    logit_bias: Annotated[dict[str, float] | None, _only({"type": "object", "maxProperties": 0})] = None
    presence_penalty: Annotated[float | None, _only({"const": 0})] = None
    frequency_penalty: Annotated[float | None, _only({"const": 0})] = None
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema: see `constraint_fields`
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra field
    guided_json: dict[str, Any] | str | None = None  # vLLM's names before 0.12
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_template: str | None = None  # dgemma's template, in the guided_* style
    best_of: Annotated[AnyInt | None, _only({"const": 1})] = None

    @property
    def drafts(self) -> bool:
        return bool(self.dgemma and self.dgemma.drafts)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Common):
    prompt: Annotated[str | list[TokenId] | list[str] | list[list[TokenId]], WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": _TOKEN, "minItems": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "array", "items": _TOKEN, "minItems": 1}, "minItems": 1,
         "maxItems": 1}]})]
    echo: Annotated[bool | None, _only({"const": False})] = None
    suffix: Annotated[str | None, _only({"type": "string", "maxLength": 0})] = None
    logprobs: Annotated[AnyInt | None, WithJsonSchema({"type": "null"})] = None


class ChatMessage(_Strict):
    role: Annotated[Literal["system", "developer", "user", "assistant", "tool"],
                    WithJsonSchema({"enum": ["system", "developer", "user", "assistant"]})]
    content: Annotated[str | list[dict[str, Any]] | None, _only({"anyOf": [{"type": "string"}, _TEXT_PARTS]})] = None
    name: str | None = None
    tool_calls: Annotated[list[dict[str, Any]] | None, _only({"type": "array", "maxItems": 0})] = None
    tool_call_id: Annotated[str | None, _only({"type": "string", "maxLength": 0})] = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: Count | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. {"enable_thinking": false}
    logprobs: Annotated[bool | None, _only({"const": False})] = None
    top_logprobs: Annotated[AnyInt | None, _only({"const": 0})] = None
    tools: Annotated[list[dict[str, Any]] | None, _only({"type": "array", "maxItems": 0})] = None
    tool_choice: Annotated[str | dict[str, Any] | None, _only({"const": "none"})] = None
    functions: Annotated[list[dict[str, Any]] | None, _only({"type": "array", "maxItems": 0})] = None
    function_call: Annotated[str | dict[str, Any] | None, WithJsonSchema({"type": "null"})] = None
    parallel_tool_calls: bool | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def unsupported(req: _Common) -> RequestError | None:
    """The first requested feature dgemma does not implement, as a 400 naming the field (None if all is fine)."""
    def err(param: str, what: str) -> RequestError:
        return RequestError(f"'{param}' is not supported by dgemma: {what}", param=param, code="unsupported_feature")

    if req.n not in (None, 1):
        return err("n", "one choice per request (n must be 1); send several requests with different seeds")
    if req.best_of not in (None, 1):
        return err("best_of", "best_of must be 1")
    if req.logit_bias:
        return err("logit_bias", "logit biases are not implemented")
    if req.presence_penalty or req.frequency_penalty:
        return err("presence_penalty" if req.presence_penalty else "frequency_penalty", "penalties are not "
                   "implemented (a canvas is sampled in parallel, so there is no sequential history to penalise)")
    if req.stream_options is not None and not req.stream:
        return RequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            return err("logprobs", "log probabilities are not returned")
        if req.echo:
            return err("echo", "echo is not implemented")
        if req.suffix:
            return err("suffix", "insertion (suffix) is not implemented")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            return err("logprobs" if req.logprobs else "top_logprobs", "log probabilities are not returned")
        for name in ("tools", "functions", "function_call"):
            if getattr(req, name):
                return err(name, "tool and function calling are not implemented")
        if req.tool_choice not in (None, "none"):
            return err("tool_choice", "tool calling is not implemented")
        if not req.messages:
            return RequestError("'messages' must hold at least one message", param="messages")
    return None


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise RequestError(f"'prompt' holds {len(p)} prompts: dgemma takes one prompt per request "
                               "(batched prompts are not supported; send concurrent requests)", param="prompt",
                               code="unsupported_feature")
        p = p[0]
    if not p:
        raise RequestError("'prompt' is empty", param="prompt")
    return p


def template_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template takes them: text parts joined (kept as parts beside images), developer ->
    system."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role == "tool" or m.tool_calls or m.tool_call_id:
            raise RequestError(f"messages[{i}]: tool messages and tool calls are not supported",
                               param=f"messages.{i}", code="unsupported_feature")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") == "image_url":  # [vision] images stay parts: server/media.py reads them
                    continue
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content[{j}]: part type {part.get('type')!r} is not "
                                       "supported (text and image_url only)",
                                       param=f"messages.{i}.content", code="unsupported_feature")
                texts.append(part["text"])
            has_images = any(part.get("type") == "image_url" for part in content)  # [vision]
            content = [dict(part) for part in content] if has_images else "".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def constraint_fields(req: _Common) -> tuple[str | None, dict[str, Any]]:
    """The request's constraint as SamplingParams fields, and the request field it came from (for errors)."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(("response_format", {"json_schema": {"type": "object"}}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise RequestError("response_format.json_schema must be an object with a 'schema' object "
                                   "(and optionally 'name' and 'strict')", param="response_format")
            found.append(("response_format", {"json_schema": spec.get("schema", {})}))
        elif kind != "text":
            raise RequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                               param="response_format")
    so = req.structured_outputs
    for field, value, name in [("structured_outputs.json", so and so.json_, "json_schema"),
                               ("structured_outputs.regex", so and so.regex, "regex"),
                               ("structured_outputs.choice", so and so.choice, "choice"),
                               ("structured_outputs.grammar", so and so.grammar, "grammar"),
                               ("structured_outputs.template", so and so.template, "template"),
                               ("guided_template", req.guided_template, "template"),
                               ("guided_grammar", req.guided_grammar, "grammar"),
                               ("guided_json", req.guided_json, "json_schema"),
                               ("guided_regex", req.guided_regex, "regex"),
                               ("guided_choice", req.guided_choice, "choice")]:
        if value is not None:
            found.append((field, {name: value}))
    if len(found) > 1:
        raise RequestError(f"give one constraint per request, got {', '.join(f for f, _ in found)}",
                           param=found[1][0])
    return found[0] if found else (None, {})


def sampling_params(req: _Common, max_new_tokens: int) -> SamplingParams:
    """The engine's parameters for a request; their own validation errors become 400s naming the field."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    source, constraint = constraint_fields(req)
    if constraint:
        try:
            SamplingParams(**constraint)
        except ValueError as e:
            raise RequestError(f"{source}: {e}", param=source) from None
    try:
        return SamplingParams(**constraint,
            max_new_tokens=max_new_tokens, seed=req.seed, stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
            top_k=req.top_k if req.top_k is not None else 0, top_p=req.top_p if req.top_p is not None else 1.0,
            max_denoising_steps=req.max_denoising_steps, entropy_bound=req.entropy_bound, t_min=req.t_min,
            t_max=req.t_max, stability_threshold=req.stability_threshold,
            confidence_threshold=req.confidence_threshold, trace=req.drafts)
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split(" ")[0]) from None


# -- responses ---------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class ChatChoice(BaseModel):
    index: int = 0
    message: dict[str, Any]  # {"role": "assistant", "content": ...}
    logprobs: None = None
    finish_reason: str | None


class StreamChoice(BaseModel):
    index: int = 0
    text: str | None = None  # completions
    delta: dict[str, Any] | None = None  # chat
    logprobs: None = None
    finish_reason: str | None = None


class Response(BaseModel):
    """A completion, chat completion, or one streamed chunk of either (`object` tells which)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice | ChatChoice | StreamChoice]
    usage: Usage | None = None
    dgemma: dict[str, Any] | None = None  # per-canvas steps, tokens per forward; a draft canvas in drafts


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "dgemma"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamWriter:
    """The SSE bytes of one streamed request: OpenAI chunks, `dgemma.draft` chunks, the usage chunk, errors, [DONE].

    Drafts and the usage chunk carry `"choices": []`, so OpenAI clients (which must skip the usage chunk anyway)
    pass over drafts they did not ask to render."""

    def __init__(self, request_id: str, model: str, chat: bool):
        self.id, self.model, self.chat, self.created = request_id, model, chat, int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _sse(self, choices: list, object: str | None = None, **kw) -> bytes:
        r = Response(id=self.id, object=object or self.object, created=self.created, model=self.model,
                     choices=choices, **kw)
        return b"data: " + r.model_dump_json(exclude_none=True).encode() + b"\n\n"

    def _choice(self, text: str | None, finish: str | None = None, role: bool = False) -> StreamChoice:
        if not self.chat:
            return StreamChoice(text=text or "", finish_reason=finish)
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return StreamChoice(delta=delta, finish_reason=finish)

    def role(self) -> bytes:
        return self._sse([self._choice(None, role=True)])

    def text(self, text: str, dgemma: dict | None = None) -> bytes:
        return self._sse([self._choice(text)], dgemma=dgemma)

    def finish(self, reason: str | None, dgemma: dict | None = None) -> bytes:
        return self._sse([self._choice(None, finish=reason)], dgemma=dgemma)

    def usage(self, usage: Usage) -> bytes:
        return self._sse([], usage=usage)

    def draft(self, info: dict) -> bytes:
        return self._sse([], object="dgemma.draft", dgemma=info)

    @staticmethod
    def error(message: str, type: str = "server_error", param: str | None = None, code: str | None = None) -> bytes:
        return b"data: " + json.dumps(error_body(message, type, param, code)).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
