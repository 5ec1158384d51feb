"""Chat templates: each renders the expected text for a known turn; ChatML matches SmolLM2's own template."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.templates import LLAMA2_SYSTEM, SMOLLM2_SYSTEM, TEMPLATES, VICUNA_SYSTEM, ChatTemplate, get_template

# (name, first turn, later turn) for user text "Hi", written out by hand from the upstream formats.
EXPECTED = [
    ("base", "Hi", "Hi"),
    ("llama", "Hi", "Hi"),
    ("vicuna", f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: ", " USER: Hi ASSISTANT: "),
    ("internlm-chat-7b", "<|User|>:Hi<eoh>\n<|Bot|>:", "\n<|User|>:Hi<eoh>\n<|Bot|>:"),
    ("llama2", f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nHi [/INST] ", "[INST] Hi [/INST] "),
    (
        "qwen-7b",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "smollm2",
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
]


@pytest.mark.parametrize("name,first,later", EXPECTED)
def test_known_turns(name, first, later):
    t = get_template(name)
    assert t.get_prompt("Hi", sequence_start=True) == first
    assert t.get_prompt("Hi", sequence_start=False) == later


def test_required_names_and_fields():
    required = {"base", "llama", "llama2", "vicuna", "internlm-chat-7b", "qwen-7b", "chatml", "smollm2"}
    assert required <= set(TEMPLATES)
    for name, t in TEMPLATES.items():
        assert isinstance(t, ChatTemplate) and t.name == name
        assert t.session_len > 0 and isinstance(t.stop_words, tuple)
        assert t.temperature >= 0 and 0 < t.top_p <= 1 and t.repetition_penalty > 0
    assert get_template("internlm-chat-7b").stop_words == ("<eoa>",)
    assert get_template("internlm-chat-7b").session_len == 2048
    assert get_template("internlm-chat-7b-8k").session_len == 8192
    assert get_template("smollm2").stop_words == ("<|im_end|>",) and not get_template("smollm2").add_bos
    assert get_template("llama2").add_bos and get_template("llama2").session_len == 4096


def test_frozen():
    with pytest.raises(AttributeError):
        get_template("base").session_len = 1


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown chat template.*'gpt-9'.*known: .*llama2.*smollm2"):
        get_template("gpt-9")


@pytest.mark.parametrize("name", ["chatml", "smollm2"])
def test_chatml_matches_smollm2_tokenizer(demo_model, name):
    """The first turn is exactly what SmolLM2's chat_template.jinja renders for one user message."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    text = "What is the capital of France?\nAnswer briefly."
    ref = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ours = get_template(name).get_prompt(text, sequence_start=True)
    assert ours == ref
    assert tok.encode(ours, add_special_tokens=False) == tok.encode(ref, add_special_tokens=False)


def test_chatml_second_turn_continues_the_reference(demo_model):
    """First turn + reply + <|im_end|> + our later turn == the tokenizer's rendering of the two-turn chat."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    t = get_template("smollm2")
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ours = t.get_prompt("Hi", True) + "Hello!" + "<|im_end|>" + t.get_prompt("Bye", False)
    assert ours == ref


def test_stop_token_ids_are_the_single_token_stop_words(demo_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert get_template("smollm2").stop_token_ids(tok) == [im_end]
    multi = ChatTemplate(name="x", stop_words=("<|im_end|>", "USER:"))  # "USER:" is several tokens: not an id
    assert multi.stop_token_ids(tok) == [im_end]
    assert get_template("base").stop_token_ids(tok) == []


def test_render_messages_matches_smollm2_tokenizer(demo_model):
    """A whole conversation (system, user, assistant, user) renders as SmolLM2's chat_template.jinja does,
    with and without an explicit system message."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    t = get_template("smollm2")
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a city.\nOne word."},
    ]
    for msgs in (turns, [{"role": "system", "content": "Be brief."}, *turns], turns[:1]):
        ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert t.render_messages(msgs) == ref
    # Ending on an assistant message continues that reply (no end-of-reply, no new assistant prefix).
    open_reply = t.render_messages(turns[:2])
    assert open_reply == t.get_prompt("Hi", True) + "Hello! How can I help?"


@pytest.mark.parametrize(
    "name,second",
    [
        ("vicuna", f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Yo</s> USER: Bye ASSISTANT: "),
        ("internlm-chat-7b", "<|User|>:Hi<eoh>\n<|Bot|>:Yo<eoa>\n<|User|>:Bye<eoh>\n<|Bot|>:"),
        ("llama2", f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] Bye [/INST] "),
        ("base", "HiYoBye"),
    ],
)
def test_render_messages_other_styles(name, second):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Bye"},
    ]
    assert get_template(name).render_messages(msgs) == second
    custom = get_template(name).render_messages([{"role": "system", "content": "S"}, msgs[0]])
    assert custom == dataclasses.replace(get_template(name), system="S").get_prompt("Hi", True)


@pytest.mark.parametrize(
    "msgs,match",
    [
        ([], "at least one user message"),
        ([{"role": "system", "content": "S"}], "at least one user message"),
        (
            [{"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}],
            r"messages\[0\]: assistant after the start",
        ),
        ([{"role": "user", "content": "U"}, {"role": "user", "content": "U"}], r"messages\[1\]: user after user"),
        ([{"role": "user", "content": "U"}, {"role": "system", "content": "S"}], r"messages\[1\]: a system message"),
        ([{"role": "user", "content": "U"}, {"role": "tool", "content": "T"}], r"messages\[1\]\.role = 'tool'"),
    ],
)
def test_render_messages_refuses_malformed_conversations(msgs, match):
    with pytest.raises(ValueError, match=match):
        get_template("smollm2").render_messages(msgs)
