"""runtime.serve over a scripted fake engine (the real one is exercised in test_serve_http.py): response,
stream and error shapes, stop strings, UTF-8-safe streaming, aborts, metrics, the engine loop dying.

The fake implements the engine's request API (add_request / abort_request / step / stats ...) with the
real SmolLM2 tokenizer: every request answers with the token ids of REPLY, one per step, then EOS.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from runtime.engine import EngineStats, StepOutput  # noqa: E402
from runtime.serve import create_app  # noqa: E402
from runtime.templates import get_template  # noqa: E402

REPLY = "Héllo wörld 🙂 ünïcode — done. The end"
EOS = 2


class FakeEngine:
    """Each step appends the next REPLY token (then EOS) to every running request; blocks are reserved
    for prompt + max_tokens at admission. `fail_after` steps, step() raises."""

    def __init__(self, tokenizer, *, session_len=256, num_blocks=16, block_size=16, step_delay=0.0, fail_after=None):
        self.tokenizer = tokenizer
        self.template = get_template("smollm2")
        self.config = SimpleNamespace(start_id=1, end_id=EOS, vocab_size=49152)
        self.session_len, self.kv_dtype, self.eos_ids = session_len, "int8", {EOS}
        self.num_blocks, self.block_size = num_blocks, block_size
        self.reply = tokenizer.encode(REPLY, add_special_tokens=False) + [EOS]
        self.step_delay, self.fail_after, self.steps = step_delay, fail_after, 0
        self.running: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.added: list[tuple[list[int], object]] = []
        self.generated = self.prompted = 0
        self.thread_ids: set[int] = set()

    def _blocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def add_request(self, prompt_token_ids, params, request_id=None):
        self.thread_ids.add(threading.get_ident())
        need = len(prompt_token_ids) + params.max_tokens
        if need > self.session_len:
            raise ValueError(
                f"prompt {len(prompt_token_ids)} tokens + max_tokens {params.max_tokens} > session_len {self.session_len}"
            )
        if self._blocks(need) > self.num_blocks:
            raise ValueError(f"needs {self._blocks(need)} KV blocks, the pool has {self.num_blocks}")
        self.added.append((list(prompt_token_ids), params))
        self.running[request_id] = {
            "n": 0,
            "params": params,
            "prompt": len(prompt_token_ids),
            "blocks": self._blocks(need),
        }
        self.prompted += len(prompt_token_ids)
        return request_id

    def abort_request(self, request_id):
        self.thread_ids.add(threading.get_ident())
        if self.running.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.running)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.fail_after is not None and self.steps > self.fail_after:
            raise RuntimeError("simulated kernel failure")
        time.sleep(self.step_delay)
        outs = []
        for rid, r in list(self.running.items()):
            p = r["params"]
            tok = self.reply[r["n"] % len(self.reply)]
            r["n"] += 1
            self.generated += 1
            stop = (tok == EOS and not p.ignore_eos) or tok in (p.stop_token_ids or ())
            length = r["n"] >= p.max_tokens
            done = stop or length
            outs.append(
                StepOutput(rid, [tok], done, "stop" if stop else "length" if done else None, r["prompt"], r["n"])
            )
            if done:
                del self.running[rid]
        return outs

    def stats(self):
        used = sum(r["blocks"] for r in self.running.values())
        return EngineStats(
            len(self.running), 0, self.num_blocks, self.num_blocks - used, self.block_size, self.kv_dtype,
            self.num_blocks * self.block_size, 0, self.generated, self.prompted,
        )  # fmt: skip

    def banner(self):
        return "fake engine"


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture
def served(tokenizer):
    """Factory: (client, fake engine) for an app on a fresh FakeEngine; closed after the test."""
    stack = []

    def make(api_key=None, **kw):
        engine = FakeEngine(tokenizer, **kw)
        client = TestClient(create_app(engine, model_name="smol", api_key=api_key))
        client.__enter__()
        stack.append(client)
        return client, engine

    yield make
    for c in stack:
        c.__exit__(None, None, None)


def reply_text(tokenizer, n: int) -> str:
    ids = tokenizer.encode(REPLY, add_special_tokens=False) + [EOS]
    return tokenizer.decode(ids[:n], skip_special_tokens=True)


def sse_events(response) -> list:
    """The data payloads of an SSE body (parsed JSON, or the string '[DONE]'); checks the framing."""
    body = response.text if hasattr(response, "text") else response
    assert body.endswith("\n\n")
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


# -- happy paths ---------------------------------------------------------------------------------
def test_completion_text_usage_and_length(served, tokenizer):
    client, engine = served()
    r = client.post("/v1/completions", json={"model": "smol", "prompt": "Hi there", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "smol" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == reply_text(tokenizer, 5) and choice["finish_reason"] == "length" and choice["index"] == 0
    prompt_ids = tokenizer.encode("Hi there", add_special_tokens=False)  # smollm2: no BOS
    assert engine.added[0][0] == prompt_ids
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 5,
        "total_tokens": len(prompt_ids) + 5,
    }
    # OpenAI's defaults where the request says nothing
    p = engine.added[0][1]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.ignore_eos, p.stop) == (
        1.0,
        1.0,
        -1,
        1.0,
        False,
        None,
    )
    # only the engine thread touched the engine
    assert len(engine.thread_ids) == 1 and threading.get_ident() not in engine.thread_ids


def test_completion_fields_reach_sampling_params(served):
    client, engine = served()
    fields = {"temperature": 0, "top_p": 0.5, "top_k": 7, "repetition_penalty": 1.3, "seed": 11, "ignore_eos": True}
    r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, **fields, "stop_token_ids": [9]})
    assert r.status_code == 200, r.text
    ids, p = engine.added[0]
    assert ids == [5, 6, 7]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.seed, p.ignore_eos) == tuple(fields.values())
    assert p.max_tokens == 3 and p.stop_token_ids == [9]


def test_tiny_temperature_is_greedy(served):
    """As vLLM: below 1e-5 the temperature means greedy (dividing the logits by it would overflow)."""
    client, engine = served()
    assert (
        client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 1e-40}).status_code == 200
    )
    assert engine.added[0][1].temperature == 0


def test_a_failing_add_request_does_not_kill_the_loop(served, monkeypatch):
    client, engine = served()
    monkeypatch.setattr(engine, "add_request", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    err = error_of(client.post("/v1/completions", json={"prompt": "Hi"}), 500)
    assert "boom" in err["message"] and client.get("/health").status_code == 200
    monkeypatch.undo()
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_eos_ends_with_stop_and_is_not_text(served, tokenizer):
    client, engine = served()
    n = len(engine.reply)
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 200})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == REPLY
    assert r.json()["usage"]["completion_tokens"] == n  # the EOS counts as generated, as in vLLM


def test_answer_cut_inside_a_character_drops_the_partial_bytes(served):
    """max_tokens ends between the two byte tokens of ' ü': the stream never shows U+FFFD (vLLM drops them)."""
    from runtime.detokenize import IncrementalDetokenizer

    if not hasattr(IncrementalDetokenizer, "finish"):
        pytest.skip("IncrementalDetokenizer.finish (drop an incomplete UTF-8 tail) is not merged yet")
    client, engine = served()
    cut = next(i for i in range(len(engine.reply)) if engine.tokenizer.decode(engine.reply[:i]).endswith("\ufffd"))
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": cut, "stream": stream})
        text = (
            "".join(e["choices"][0]["text"] for e in sse_events(r.text)[:-1])
            if stream
            else r.json()["choices"][0]["text"]
        )
        assert text == "Héllo wörld 🙂 "


def test_batch_of_prompts_gives_one_choice_each(served, tokenizer):
    client, engine = served()
    r = client.post("/v1/completions", json={"prompt": ["Hi", "Hello there"], "max_tokens": 3})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == reply_text(tokenizer, 3) for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 6


def test_stream_completion_utf8_safe_with_usage(served, tokenizer):
    client, engine = served()
    req = {"prompt": "Hi", "max_tokens": 100, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(engine.reply)
    chunks = events[:-2]
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == REPLY
    assert all("\ufffd" not in p for p in pieces)  # the emoji's byte tokens never arrive half
    assert len([p for p in pieces if p]) > 5  # really streamed, not one blob
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c["usage"] is None for c in chunks) and len({c["id"] for c in events[:-1]}) == 1


def test_chat_renders_template_and_streams(served, tokenizer):
    client, engine = served()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = client.post("/v1/chat/completions", json={"model": "smol", "messages": msgs, "max_tokens": 4})
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": reply_text(tokenizer, 4)}
    assert body["choices"][0]["finish_reason"] == "length"
    rendered = get_template("smollm2").render_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert engine.added[0][0] == tokenizer.encode(rendered, add_special_tokens=False)
    assert "<|im_end|>" in engine.added[0][1].stop  # the template's stop words are stop strings

    # no max_tokens: the room the session leaves (vLLM's default)
    client.post("/v1/chat/completions", json={"messages": msgs[1:]})
    assert engine.added[-1][1].max_tokens == engine.session_len - len(engine.added[-1][0])

    with client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "stream": True}) as r:
        events = sse_events(r.read().decode())
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == REPLY
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_stop_string_cuts_and_aborts(served, tokenizer):
    client, engine = served()
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100, "stop": ["wörld"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == "Héllo " and choice["finish_reason"] == "stop"
    wait_for(lambda: engine.aborted)  # the engine was told at once, freeing the blocks
    assert not engine.running
    # a stop string that is split over several tokens and streamed
    with client.stream(
        "POST", "/v1/completions", json={"prompt": "Hi", "stop": "🙂 ü", "stream": True, "max_tokens": 100}
    ) as r:
        events = sse_events(r.read().decode())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Héllo wörld "
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_models_health_metrics(served):
    client, engine = served()
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["smol"]
    assert models["data"][0]["max_model_len"] == engine.session_len
    assert client.get("/health").status_code == 200
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    text = client.get("/metrics").text
    for line in (
        "kvq_num_requests_running 0.0",
        "kvq_num_requests_waiting 0.0",
        "kvq_kv_blocks_used 0.0",
        f"kvq_kv_blocks_total {float(engine.num_blocks)}",
        'kvq_kv_cache_info{block_size="16",kv_dtype="int8"} 1.0',
        "kvq_generation_tokens_total 3.0",
        "kvq_num_preemptions_total 0.0",
        "kvq_e2e_request_latency_seconds_count 1.0",
        "kvq_time_to_first_token_seconds_count 1.0",
        'kvq_requests_finished_total{finished_reason="length"} 1.0',
    ):
        assert line in text, line


# -- errors --------------------------------------------------------------------------------------
def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


@pytest.mark.parametrize(
    "body,param,words",
    [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "request body"),
        ({"prompt": "Hi", "max_tokens": "5"}, "max_tokens", "max_tokens = '5'"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "Hi", "temperature": -1}, "temperature", "temperature = -1"),
        ({"prompt": "Hi", "top_p": 1.5}, "top_p", "top_p = 1.5"),
        ({"prompt": "Hi", "stream": "yes"}, "stream", "stream = 'yes'"),
        ({"prompt": "Hi", "repetition_penalty": 1e-40}, "repetition_penalty", "repetition_penalty = 1e-40"),
        ({"prompt": "Hi", "seed": 2**64}, "seed", f"seed = {2**64}"),
        ({"prompt": "Hi", "stop": 5}, "stop", "stop = 5"),
        ({"prompt": 5}, "prompt", "prompt = 5"),
        ({"max_tokens": 5}, "prompt", "prompt: field required"),
        ({"prompt": "Hi", "n": 2}, "n", "n = 2"),
        ({"prompt": "Hi", "logprobs": 3}, "logprobs", "logprobs = 3: not supported"),
        ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options", "stream = true"),
        ({"prompt": [1, 49152]}, "prompt", "prompt[1] = 49152: token id out of range [0, 49152)"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "Hi", "max_tokens": 300}, None, "max_tokens 300 > session_len 256"),
    ],
)
def test_completion_errors(served, body, param, words):
    client, _ = served()
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    err = error_of(client.post("/v1/completions", **kw), 400)
    assert err["type"] == "BadRequestError" and err["param"] == param and words in err["message"], err


@pytest.mark.parametrize(
    "messages,words",
    [
        ([{"role": "user", "content": 5}], "messages.0.content = 5"),
        ([{"role": "robot", "content": "x"}], "messages.0.role = 'robot'"),
        ([{"role": "assistant", "content": "x"}], "at least one user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]: user after user"),
    ],
)
def test_chat_errors(served, messages, words):
    client, _ = served()
    err = error_of(client.post("/v1/chat/completions", json={"messages": messages}), 400)
    assert words in err["message"] and err["param"] == "messages"


def test_pool_too_small_unknown_model_unknown_route(served):
    client, _ = served(num_blocks=2, block_size=16)
    err = error_of(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 40}), 400)
    assert "the pool has 2" in err["message"]
    err = error_of(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "Hi"}), 404)
    assert err["type"] == "NotFoundError" and "gpt-9" in err["message"] and err["param"] == "model"
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "NotFoundError"


def test_api_key(served):
    client, _ = served(api_key="sekrit")
    req = {"prompt": "Hi", "max_tokens": 2}
    assert "missing API key" in error_of(client.post("/v1/completions", json=req), 401)["message"]
    wrong = client.post("/v1/completions", json=req, headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401)["type"] == "AuthenticationError"
    assert error_of(client.get("/v1/models"), 401)
    ok = client.post("/v1/completions", json=req, headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_engine_loop_death(served):
    client, engine = served(fail_after=2)
    err = error_of(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 10}), 500)
    assert "simulated kernel failure" in err["message"]
    assert client.get("/health").status_code == 503
    assert "kvq_engine_healthy 0.0" in client.get("/metrics").text
    err = error_of(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 10}), 503)
    assert "engine loop is not running" in err["message"]


def test_stream_gets_error_event_when_engine_dies(served):
    client, _ = served(fail_after=3)
    with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 10, "stream": True}) as r:
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500


# -- a real socket: disconnects ------------------------------------------------------------------
def test_disconnect_aborts_stream_and_plain_request(tokenizer):
    """On a real uvicorn server: a client that goes away mid-stream, or while waiting for a non-streamed
    answer, aborts its request (its blocks are freed) while other clients carry on."""
    import httpx
    import uvicorn

    engine = FakeEngine(tokenizer, step_delay=0.02)
    app = create_app(engine, model_name="smol")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10)
        url = f"http://127.0.0.1:{port}/v1/completions"
        long = {"prompt": "Hi", "max_tokens": 200, "ignore_eos": True}
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", url, json={**long, "stream": True}) as r:
                next(r.iter_lines())  # one chunk, then hang up
            wait_for(lambda: len(engine.aborted) == 1 and not engine.running)
            with pytest.raises(httpx.ReadTimeout):
                c.post(url, json=long, timeout=0.3)
            wait_for(lambda: len(engine.aborted) == 2 and not engine.running)
            r = c.post(url, json={"prompt": "Hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            metrics = c.get(f"http://127.0.0.1:{port}/metrics").text
        assert "kvq_kv_blocks_used 0.0" in metrics and "kvq_num_requests_running 0.0" in metrics
        assert 'kvq_requests_finished_total{finished_reason="abort"} 2.0' in metrics
    finally:
        server.should_exit = True
        thread.join(10)
    assert not app.state.engine_loop.thread.is_alive()  # lifespan shutdown stopped the engine thread
