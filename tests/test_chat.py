"""The chat REPL: scripted sessions over text streams, first against a recording fake engine that
follows the Engine interface, then end to end on real workspaces (tiny random model; SmolLM2 slow)."""

from __future__ import annotations

import dataclasses
import io
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.chat import PROMPT, ChatSession, main
from runtime.engine import RequestError
from runtime.sampling import SamplingParams
from runtime.templates import get_template

ROOT = Path(__file__).resolve().parents[1]
EOS = 2  # SmolLM2 <|im_end|>


@dataclasses.dataclass
class FakeSession:
    slot: int
    num_tokens: int = 0


class FakeEngine:
    """Engine stand-in: records every stream call and 'generates' canned replies (then EOS)."""

    def __init__(self, tokenizer, replies, *, template=None, session_len=2048, interrupt_at=None, sigint_at=None):
        self.tokenizer = tokenizer
        self.template = template or get_template("smollm2")
        self.config = SimpleNamespace(start_id=1, end_id=EOS)
        self.session_len = session_len
        self.replies = list(replies)
        self.interrupt_at = interrupt_at  # {turn index: token index} raising KeyboardInterrupt there
        self.sigint_at = sigint_at  # {turn index: token index} sending SIGINT to this process there
        self.calls: list[dict] = []
        self.ended: list[FakeSession] = []
        self.next_slot = 0

    def new_session(self):
        self.next_slot += 1
        return FakeSession(slot=self.next_slot)

    def end_session(self, session):
        self.ended.append(session)
        session.slot, session.num_tokens = -1, 0

    def stream(self, session, new_token_ids, params):
        if session.num_tokens + len(new_token_ids) + params.max_tokens > self.session_len:
            raise RequestError(
                f"{session.num_tokens} + {len(new_token_ids)} + {params.max_tokens} > {self.session_len}"
            )
        call = dict(slot=session.slot, before=session.num_tokens, ids=list(new_token_ids), yielded=[], closed=False)
        self.calls.append(call)
        return self._gen(session, call, params, len(self.calls) - 1)

    def _gen(self, session, call, params, turn):
        session.num_tokens += len(call["ids"])
        reply = self.tokenizer.encode(self.replies[turn], add_special_tokens=False) + [EOS]
        try:
            for i, token in enumerate(reply[: params.max_tokens]):
                if (self.interrupt_at or {}).get(turn) == i:
                    raise KeyboardInterrupt
                if (self.sigint_at or {}).get(turn) == i:  # a real Ctrl-C arriving mid-step
                    signal.raise_signal(signal.SIGINT)
                session.num_tokens += 1
                call["yielded"].append(token)
                yield token
        except GeneratorExit:
            call["closed"] = True
            raise


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def run_chat(engine, stdin_text, **params):
    params = SamplingParams(**{"max_tokens": 64, "stop": ["<|im_end|>"], "stop_token_ids": [EOS], **params})
    out, err = io.StringIO(), io.StringIO()
    chat = ChatSession(engine, params, stdin=io.StringIO(stdin_text), stdout=out, stderr=err)
    rc = chat.run()
    return rc, out.getvalue(), err.getvalue(), chat


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_multi_round_sends_only_new_tokens(tokenizer):
    replies = ["Hello! 😀 Ça va? 日本語です.", "Second answer 👍🏽 naïve."]
    engine = FakeEngine(tokenizer, replies)
    script = "Hi there,\nsecond line\n\nWhat about 😀 日本?\n\nexit\n\nnever sent\n\n"
    rc, out, err, chat = run_chat(engine, script)
    assert rc == 0 and err == ""
    t = engine.template
    first, second = engine.calls
    assert first["ids"] == encode(tokenizer, t.get_prompt("Hi there,\nsecond line", True))
    assert t.system in tokenizer.decode(first["ids"])
    # the second turn carries only its own text, no system block and no history
    assert second["ids"] == encode(tokenizer, t.get_prompt("What about 😀 日本?", False))
    assert t.system not in tokenizer.decode(second["ids"]) and "Hi there" not in tokenizer.decode(second["ids"])
    assert second["slot"] == first["slot"]
    assert second["before"] == len(first["ids"]) + len(first["yielded"])  # the cache kept the history
    assert out.count(PROMPT) == 3  # two turns, then `exit`
    assert replies[0] + "\n" in out and replies[1] + "\n" in out  # streamed answers, EOS not printed
    assert "\ufffd" not in out and "<|im_end|>" not in out
    assert len(engine.calls) == 2  # nothing after `exit`


def test_answer_cut_by_max_tokens_ends_without_replacement_char(tokenizer):
    """--max-new-tokens stopping inside an emoji: the partial bytes are dropped, not printed as U+FFFD."""
    engine = FakeEngine(tokenizer, ["Ça 👍🏽"])
    assert len(encode(tokenizer, "Ça 👍🏽")) == 9  # the thumbs-up is complete after 6 tokens, its skin tone after 9
    rc, out, err, chat = run_chat(engine, "hi\n\n", max_tokens=7)
    assert rc == 0 and "\ufffd" not in out
    assert out.split(PROMPT)[1].strip() == "Ça 👍"


def test_end_resets_session(tokenizer):
    engine = FakeEngine(tokenizer, ["one", "two", "three"])
    rc, out, err, chat = run_chat(engine, "a\n\nb\n\nend\n\nc\n\n")
    assert rc == 0
    a, b, c = engine.calls
    assert len(engine.ended) == 1 and engine.ended[0].slot == -1
    assert c["slot"] != a["slot"] and c["before"] == 0
    assert c["ids"] == encode(tokenizer, engine.template.get_prompt("c", True))  # system block again
    assert "session ended" in err
    assert out.endswith("three\n" + "\n" + PROMPT + "\n")  # EOF quits cleanly after the last prompt


def test_bos_on_first_turn_only(tokenizer):
    template = dataclasses.replace(get_template("smollm2"), add_bos=True)
    engine = FakeEngine(tokenizer, ["x", "y"], template=template)
    run_chat(engine, "a\n\nb\n\n")
    assert engine.calls[0]["ids"][0] == 1 and engine.calls[0]["ids"][1:] == encode(
        tokenizer, template.get_prompt("a", True)
    )
    assert engine.calls[1]["ids"] == encode(tokenizer, template.get_prompt("b", False))


def test_overflow_refused_with_warning(tokenizer):
    engine = FakeEngine(tokenizer, ["short", "fits again"], session_len=100)
    long_text = "word " * 60
    rc, out, err, chat = run_chat(engine, f"hi\n\n{long_text}\n\nend\n\nhi\n\n", max_tokens=16)
    assert rc == 0
    assert len(engine.calls) == 2  # the long turn never reached the engine's cache
    assert "warning" in err and "`end`" in err
    assert engine.calls[1]["before"] == 0 and "fits again" in out


def test_ctrl_c_stops_answer_and_keeps_session(tokenizer):
    replies = ["one two three four five six", "after the interrupt"]
    engine = FakeEngine(tokenizer, replies, interrupt_at={0: 3})
    rc, out, err, chat = run_chat(engine, "first\n\nsecond\n\n")
    assert rc == 0
    first, second = engine.calls
    assert len(first["yielded"]) == 3
    assert "interrupted" in err
    shown = tokenizer.decode(first["yielded"])
    assert shown + "\n" in out and "four" not in out
    assert second["slot"] == first["slot"] and second["before"] == len(first["ids"]) + 3  # session kept
    assert second["ids"] == encode(tokenizer, engine.template.get_prompt("second", False))
    assert "after the interrupt" in out


def test_real_sigint_stops_after_current_token(tokenizer):
    """A real SIGINT during a generation step lets that token finish, then stops the answer cleanly."""
    handler_before = signal.getsignal(signal.SIGINT)
    engine = FakeEngine(tokenizer, ["one two three four five six", "next"], sigint_at={0: 2})
    rc, out, err, chat = run_chat(engine, "first\n\nsecond\n\n")
    first, second = engine.calls
    assert rc == 0 and "interrupted" in err
    assert len(first["yielded"]) == 3 and first["closed"]  # token 2 was completed and shown, then the stream closed
    assert tokenizer.decode(first["yielded"]) + "\n" in out
    assert second["before"] == len(first["ids"]) + 3 and "next" in out
    assert signal.getsignal(signal.SIGINT) is handler_before  # the REPL's handler is gone after the turn


def test_multi_token_stop_string_cuts_and_closes(tokenizer):
    template = dataclasses.replace(get_template("smollm2"), stop_words=("User:",))
    engine = FakeEngine(tokenizer, ["Sure, here 😀. User: fake turn", "next"], template=template)
    rc, out, err, chat = run_chat(engine, "q\n\nq2\n\n", stop=["User:"])
    first = engine.calls[0]
    assert "Sure, here 😀. \n" in out and "fake turn" not in out and "User" not in out
    assert first["closed"]  # the engine's generator was stopped early
    assert engine.calls[1]["before"] == len(first["ids"]) + len(first["yielded"])


def test_eof_without_final_empty_line_is_answered(tokenizer):
    engine = FakeEngine(tokenizer, ["answer"])
    rc, out, err, chat = run_chat(engine, "question")
    assert rc == 0 and "answer\n" in out and len(engine.calls) == 1
    rc, out, err, chat = run_chat(FakeEngine(tokenizer, []), "")
    assert rc == 0 and out == "\n" + PROMPT + "\n"


def test_bad_workspace_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.chat", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "config.ini" in proc.stderr and str(tmp_path / "nope") in proc.stderr


# -- real engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_workspace(tiny_hf, tmp_path_factory):
    from rt_workspace import make_workspace

    return make_workspace(tiny_hf("llama"), tmp_path_factory.mktemp("chat_ws") / "ws", session_len=256)


def test_missing_kv_scales_exit_code_2(tiny_workspace):
    err = io.StringIO()
    rc = main(
        [str(tiny_workspace), "--kv-cache-dtype", "int8"], stdin=io.StringIO(""), stdout=io.StringIO(), stderr=err
    )
    assert rc == 2 and len(err.getvalue().strip().splitlines()) == 1 and "kv_qparams" in err.getvalue()


def test_real_engine_history_kept_between_turns(tiny_workspace):
    """Greedy turn 2 through the REPL equals greedy generation on turn 1 + answer 1 + turn 2 in one go."""
    from runtime.engine import Engine

    engine = Engine(tiny_workspace)
    calls = []
    stream = engine.stream

    def recording_stream(session, ids, params):
        calls.append((session.num_tokens, list(ids)))
        gen_ids = []
        calls[-1] += (gen_ids,)
        for t in stream(session, ids, params):
            gen_ids.append(t)
            yield t

    engine.stream = recording_stream
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = io.StringIO()
    ChatSession(engine, params, stdin=io.StringIO("Hello\n\nGo on 😀\n\n"), stdout=out).run()
    (before1, ids1, gen1), (before2, ids2, gen2) = calls
    assert before1 == 0 and before2 == len(ids1) + len(gen1) == len(ids1) + 8
    assert ids2 == engine.tokenizer.encode(engine.template.get_prompt("Go on 😀", False), add_special_tokens=False)
    one_go = engine.generate([ids1 + gen1 + ids2], [params])[0]
    assert gen2 == one_go
    assert engine.tokenizer.decode(gen1) in out.getvalue()


def test_cli_piped_stdin(tiny_workspace):
    script = "Hello there\n\nend\n\nHello there\n\nexit\n\n"
    cmd = [sys.executable, "-m", "runtime.chat", str(tiny_workspace), "--temperature", "0", "--max-new-tokens", "6"]
    proc = subprocess.run(cmd, cwd=ROOT, input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("KV cache fp16")  # the engine banner comes first
    assert proc.stdout.count(PROMPT) == 4 and "session ended" in proc.stderr and "Traceback" not in proc.stderr
    first, after_end, second = proc.stdout.split(PROMPT)[1:4]
    assert after_end == "\n"
    # greedy from a fresh session after `end`: the same turn gives the same answer
    assert first.strip() and first == second


def test_real_engine_ctrl_c_keeps_yielded_tokens(tiny_workspace):
    """KeyboardInterrupt from the token iterator after 3 tokens: the next turn continues from them."""
    from runtime.engine import Engine

    engine = Engine(tiny_workspace, max_batch_size=2)
    stream, calls = engine.stream, []

    def interrupting_stream(session, ids, params):
        calls.append((list(ids), []))
        inner = stream(session, ids, params)
        try:
            for t in inner:
                calls[-1][1].append(t)
                yield t
                if len(calls) == 1 and len(calls[0][1]) == 3:  # the consumer asks for a 4th token: Ctrl-C
                    raise KeyboardInterrupt
        finally:
            inner.close()

    engine.stream = interrupting_stream
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    err = io.StringIO()
    chat = ChatSession(engine, params, stdin=io.StringIO("Hello\n\nGo on\n\n"), stdout=io.StringIO(), stderr=err)
    assert chat.run() == 0 and "interrupted" in err.getvalue()
    (ids1, gen1), (ids2, gen2) = calls
    assert len(gen1) == 3 and len(gen2) == 8
    assert gen2 == engine.generate([ids1 + gen1 + ids2], [params])[0]


@pytest.mark.parametrize(
    "flags, banner",
    [
        (["--kv-cache-dtype", "int8"], "KV cache int8"),
        (["--kv-cache-dtype", "fp8", "--calculate-kv-scales"], "fp8_e4m3"),
        (["--kv-cache-dtype", "int4_per_token_head", "--kv-rotation", "off"], "KV cache int4_per_token_head"),
        (["--kv-cache-dtype", "int8_per_token_head"], "Hadamard-rotated"),
    ],
)
def test_quantized_cache_flags_reach_engine(tiny_workspace, tmp_path, flags, banner):
    import shutil

    from rt_workspace import write_params

    ws = shutil.copytree(tiny_workspace, tmp_path / "ws", symlinks=True)
    write_params(ws / "triton_models" / "weights", "int8", 0.05, 0.0, 0.05, 0.0)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(ws), *flags, "--temperature", "0", "--max-new-tokens", "4", "--use-context-fmha", "0"]
    rc = main(argv, stdin=io.StringIO("Hello\n\n"), stdout=out, stderr=err)
    assert rc == 0, err.getvalue()
    first_line = out.getvalue().splitlines()[0]
    assert first_line.startswith(banner) or banner in first_line
    assert "use_context_fmha=0" in first_line
    assert out.getvalue().split(PROMPT)[1].strip()  # an answer was streamed


@pytest.mark.slow
def test_smollm2_chat_answers(demo_model, tmp_path_factory):
    from rt_workspace import make_workspace

    ws = make_workspace(demo_model, tmp_path_factory.mktemp("chat_smollm2") / "ws")  # shared with other tests
    script = "What is the capital of France? Answer in one word.\n\nAnd of Germany?\n\n"
    out, err = io.StringIO(), io.StringIO()
    rc = main(
        [str(ws), "--temperature", "0", "--max-new-tokens", "24"], stdin=io.StringIO(script), stdout=out, stderr=err
    )
    text = out.getvalue()
    assert rc == 0, err.getvalue()
    first, second = text.split(PROMPT)[1:3]
    assert "Paris" in first and "Berlin" in second
    assert "\ufffd" not in text and "<|im_end|>" not in text


def test_kv_granularity_flag_and_the_other_granularitys_files(tiny_workspace, tmp_path):
    """config.ini per-head INT8, FP8 calibrated per tensor: --kv-cache-dtype fp8 asks for per-head FP8 files and
    the error points at the per-tensor ones and the flag; --kv-granularity tensor (or LLM's kv_granularity=)
    loads them."""
    import shutil

    from rt_workspace import write_params

    from runtime import LLM
    from runtime.workspace import load_config, replace, save_config

    ws = shutil.copytree(tiny_workspace, tmp_path / "ws", symlinks=True)
    wdir = ws / "triton_models" / "weights"
    write_params(wdir, "int8", 0.05, 0.0, 0.05, 0.0, granularity="head")
    write_params(wdir, "fp8_e4m3", 0.01, 0.0, 0.01, 0.0)
    save_config(replace(load_config(wdir), quant_policy=4, kv_cache_dtype="int8", kv_granularity="head"), wdir)
    argv = [str(ws), "--kv-cache-dtype", "fp8", "--temperature", "0", "--max-new-tokens", "2"]
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, stdin=io.StringIO("Hello\n\n"), stdout=out, stderr=err) == 2
    msg = err.getvalue()
    assert "past_kv_scale_fp8_e4m3_head.0.weight, which is missing" in msg
    assert "the tensor granularity's fp8_e4m3 files" in msg and "--kv-granularity tensor" in msg, msg
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv + ["--kv-granularity", "tensor"], stdin=io.StringIO("Hello\n\n"), stdout=out, stderr=err)
    assert rc == 0, err.getvalue()
    assert "granularity tensor" in out.getvalue().splitlines()[0]
    llm = LLM(str(ws), kv_cache_dtype="fp8", kv_granularity="tensor")
    assert llm.engine.kv_granularity == "tensor"
