"""Chat templates, keyed by the `model_name` that `python -m deploy` records in config.ini.

A template turns one user turn into prompt text ending in the assistant prefix. The first turn
of a session (`sequence_start=True`) carries the system block; later turns carry only the new
turn, because the KV cache already holds the history (docs/formats.md §5). Replies stop on the
tokenizer's EOS or on one of `stop_words`; the stop token itself is not followed by the
template's newline, so later ChatML turns open with "\\n" to close the previous reply's line.

`render_messages` renders an OpenAI-style message list (system / user / assistant) in one go, for
the HTTP server, which sends the whole conversation each time: the turns are the same `get_prompt`
pieces, each earlier reply closed by the style's end-of-reply marker (`END_OF_REPLY`).

`add_bos` asks the caller to put the tokenizer's start_id (config.ini start_id) before the first
turn; the text itself never spells a BOS token.

The table follows the 2023 LMDeploy names (base, llama, vicuna, internlm-chat-7b, llama2,
qwen-7b) plus ChatML entries (`chatml`, `smollm2`) matching SmolLM2-Instruct's own
chat_template.jinja for the first turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
    "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
    "instead of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# What closes an earlier assistant reply inside a rendered conversation, per style. In a live chat
# the reply's stop token is already in the KV cache; a re-rendered history has to spell it.
END_OF_REPLY = {"raw": "", "vicuna": "</s>", "internlm": "<eoa>", "llama2": " </s><s>", "chatml": "<|im_end|>"}


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format: how a user turn is wrapped, where replies stop, and sampling defaults."""

    name: str
    style: str = "raw"  # raw | vicuna | internlm | llama2 | chatml : which wrapping get_prompt applies
    system: str = ""
    session_len: int = 2048
    stop_words: tuple[str, ...] = ()
    add_bos: bool = True
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 40
    repetition_penalty: float = 1.0

    def stop_token_ids(self, tokenizer) -> list[int]:
        """The stop words that are single tokens (e.g. '<|im_end|>'), as ids generation can stop on."""
        ids = [tokenizer.encode(w, add_special_tokens=False) for w in self.stop_words]
        return sorted({t[0] for t in ids if len(t) == 1})

    def get_prompt(self, user_text: str, sequence_start: bool) -> str:
        """Text of one user turn, ending in the assistant prefix (system block when sequence_start)."""
        u = user_text
        if self.style == "raw":  # plain completion: the text is the prompt
            return u
        if self.style == "vicuna":
            # Upstream closes the previous reply with "</s>" as text; the reply's EOS token is
            # already in the cache here, so later turns start straight with the new turn.
            return f"{self.system} USER: {u} ASSISTANT: " if sequence_start else f" USER: {u} ASSISTANT: "
        if self.style == "internlm":
            head = "" if sequence_start else "\n"
            return f"{head}<|User|>:{u}<eoh>\n<|Bot|>:"
        if self.style == "llama2":
            if sequence_start:
                return f"[INST] <<SYS>>\n{self.system}\n<</SYS>>\n\n{u} [/INST] "
            return f"[INST] {u} [/INST] "
        if self.style == "chatml":
            if sequence_start:
                system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
                return f"{system}<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n"
            return f"\n<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n"
        raise ValueError(f"chat template {self.name!r} has unknown style {self.style!r}")

    def render_messages(self, messages: Sequence[Mapping[str, str]]) -> str:
        """A whole conversation as prompt text: an optional leading system message (it replaces the
        template's default system text), then user / assistant turns in alternation. Ending on a user
        message gives the assistant prefix; ending on an assistant message leaves that reply open, so the
        model continues it. ValueError names the offending message (messages[i])."""
        template, rest = self, list(messages)
        if rest and rest[0].get("role") == "system":
            template = dataclasses.replace(self, system=rest[0].get("content", ""))
            rest = rest[1:]
        offset = len(messages) - len(rest)
        if not any(m.get("role") == "user" for m in rest):
            raise ValueError("messages: need at least one user message")
        parts: list[str] = []
        previous = None
        for i, m in enumerate(rest, start=offset):
            role, content = m.get("role"), m.get("content", "")
            if role == "system":
                raise ValueError(f"messages[{i}]: a system message may only come first")
            if role not in ("user", "assistant"):
                raise ValueError(f"messages[{i}].role = {role!r}: expected system, user or assistant")
            if role == previous or (role == "assistant" and previous is None):
                raise ValueError(
                    f"messages[{i}]: {role} after {previous or 'the start'}; user and assistant turns must alternate, "
                    "starting with user"
                )
            if role == "user":
                if previous == "assistant":
                    parts.append(END_OF_REPLY[self.style])
                parts.append(template.get_prompt(content, sequence_start=previous is None))
            else:
                parts.append(content)
            previous = role
        return "".join(parts)


def _table() -> dict[str, ChatTemplate]:
    base = ChatTemplate(name="base", style="raw")
    internlm = ChatTemplate(name="internlm-chat-7b", style="internlm", stop_words=("<eoa>",))
    qwen = ChatTemplate(
        name="qwen-7b",
        style="chatml",
        system="You are a helpful assistant.",
        session_len=8192,
        stop_words=("<|im_end|>",),
        add_bos=False,
        temperature=1.0,
        top_p=0.5,
        top_k=40,
    )
    # SmolLM2's model card samples with temperature 0.2, top_p 0.9; its tokenizer adds no BOS.
    smollm2 = ChatTemplate(
        name="smollm2",
        style="chatml",
        system=SMOLLM2_SYSTEM,
        session_len=2048,
        stop_words=("<|im_end|>",),
        add_bos=False,
        temperature=0.2,
        top_p=0.9,
        top_k=40,
    )
    entries = [
        base,
        dataclasses.replace(base, name="llama"),
        ChatTemplate(name="vicuna", style="vicuna", system=VICUNA_SYSTEM),
        internlm,
        dataclasses.replace(internlm, name="internlm"),
        dataclasses.replace(internlm, name="internlm-chat-7b-8k", session_len=8192),
        ChatTemplate(name="llama2", style="llama2", system=LLAMA2_SYSTEM, session_len=4096),
        qwen,
        dataclasses.replace(smollm2, name="chatml"),
        smollm2,
    ]
    return {t.name: t for t in entries}


TEMPLATES: dict[str, ChatTemplate] = _table()


def get_template(name: str) -> ChatTemplate:
    """The template called `name`; a ValueError lists the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template (MODEL_NAME) {name!r}; known: {', '.join(TEMPLATES)}") from None
