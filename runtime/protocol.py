"""The OpenAI-compatible HTTP protocol of `python -m runtime.serve`: request bodies, response and
stream-chunk shapes, and errors, in one place (the server in runtime/serve.py only moves them around).

Requests are validated strictly from the raw JSON body (a string where a number belongs is a 400, not
a silent conversion); unknown fields are ignored, as vLLM does, but fields whose meaning we do not
implement (logprobs, n > 1, penalties other than repetition_penalty, tools ...) are refused when set
to anything but their no-op value, so a client never gets an answer to a different question.

Errors have vLLM's body, `{"error": {"message", "type", "param", "code"}}`, code = the HTTP status.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
# vLLM's _SAMPLING_EPS: a temperature below it is greedy (dividing logits by ~0 overflows to inf).
SAMPLING_EPS = 1e-5
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error the client gets back as vLLM's error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.err_type = err_type or ERROR_TYPES.get(status, "BadRequestError")

    def body(self) -> dict:
        return error_body(self.message, self.err_type, self.param, self.status)


def error_body(message: str, err_type: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# -- requests ------------------------------------------------------------------------------------
class _Model(BaseModel):
    # strict: no str -> int coercion; extra: ignored like vLLM (clients send e.g. `user`).
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Model):
    include_usage: bool = False


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]  # developer = OpenAI's newer name for system
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


# Fields we accept only at their no-op value: name -> the values that mean "off".
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class _Sampling(_Model):
    """Fields shared by both endpoints, with OpenAI/vLLM meanings (top_k, repetition_penalty, ignore_eos,
    stop_token_ids are vLLM's extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    # >= 1e-5: a smaller penalty divides fp32 logits into inf and sampling fails inside the engine loop
    repetition_penalty: float | None = Field(None, ge=SAMPLING_EPS)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n = {self.n}: only n = 1 is supported", "n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream = true", "stream_options")
        extra = self.model_extra or {}
        for name, off in UNSUPPORTED.items():
            if name in extra and not any(extra[name] == v for v in off):
                raise APIError(400, f"{name} = {extra[name]!r}: not supported by this server", name)
        if self.stop is not None and (
            (isinstance(self.stop, str) and not self.stop) or any(not s for s in self.stop_list)
        ):
            raise APIError(400, f"stop = {self.stop!r}: stop strings must be non-empty", "stop")
        for t in self.stop_token_ids or ():
            if t < 0:
                raise APIError(
                    400, f"stop_token_ids = {self.stop_token_ids!r}: token ids must be >= 0", "stop_token_ids"
                )

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def sampling_params(self, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        """OpenAI's defaults where a field is absent: temperature 1, top_p 1, no top_k, no penalty."""
        stop = self.stop_list + [s for s in extra_stop if s not in self.stop_list]
        try:
            return SamplingParams(
                temperature=1.0
                if self.temperature is None
                else (0.0 if self.temperature < SAMPLING_EPS else self.temperature),
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                max_tokens=max_tokens,
                ignore_eos=self.ignore_eos,
                stop=stop or None,
                stop_token_ids=self.stop_token_ids or None,
                seed=self.seed,
            )
        except ValueError as e:  # the field checks above should have caught it; never a 500
            raise APIError(400, str(e)) from None


class CompletionRequest(_Sampling):
    # A text, a list of token ids, or a batch of either (one choice each).
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise APIError(400, "prompt = []: give a text or at least one token id", "prompt")
        return list(p)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


def parse_request(cls: type[_Sampling], body: bytes) -> _Sampling:
    """Validate a raw JSON body; any problem is an APIError(400) naming the field and the value."""
    try:
        req = cls.model_validate_json(body or b"")
    except ValidationError as e:
        raise validation_error(e) from None
    req.check_supported()
    return req


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"}


def validation_error(e: ValidationError) -> APIError:
    """The first failing field, with its value and every reason pydantic gave for it (one per union branch)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {first['msg']}")
    if not first["loc"]:
        return APIError(400, f"request body: {first['msg']} (got {type(first.get('input')).__name__})")

    def path(loc) -> str:
        keep = [str(x) for x in loc if isinstance(x, int) or ("[" not in x and x not in _TYPE_TAGS)]
        return ".".join(keep)

    # Union branches report the same field several times; the branch that got deepest is the best guess.
    field = path(max(errors, key=lambda err: len(path(err["loc"])))["loc"])
    same = [err for err in errors if path(err["loc"]) == field]
    reasons = " or ".join(dict.fromkeys(err["msg"] for err in same))
    if same[0]["type"] == "missing":
        return APIError(400, f"{field}: field required", field.split(".")[0])
    return APIError(400, f"{field} = {same[0].get('input')!r}: {reasons}", field.split(".")[0])


# -- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(rid: str, created: int, model: str, texts, reasons, usage_: dict) -> dict:
    choices = [
        {"index": i, "text": t, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
    ]
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_response(rid: str, created: int, model: str, text: str, reason: str, usage_: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, reason: str | None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, created: int, model: str, delta: dict, reason: str | None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, created: int, model: str, obj: str, usage_: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the totals."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def models_list(name: str, root: str, max_model_len: int, created: int) -> dict:
    card = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "kvq",
        "root": root,
        "parent": None,
        "max_model_len": max_model_len,
    }
    return {"object": "list", "data": [card]}


def sse(payload: Any) -> str:
    """One Server-Sent Event: `data: <json>` and a blank line (`data: [DONE]` for the string)."""
    import json

    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
