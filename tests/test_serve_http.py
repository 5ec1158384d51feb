"""`python -m runtime.serve` in a subprocess on the demo model (INT8 KV cache, a small pool), driven the way
users drive it: the official `openai` client, raw HTTP for every error, and a bounded load test on
loopback (64 concurrent greedy streams, some clients hanging up early) after which /metrics must show
every KV block free. Greedy answers must equal `LLM.generate` / the same request run alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from rt_workspace import make_workspace, write_params  # noqa: E402

from runtime.engine import Engine  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(Engine, "add_request"), reason="the paged engine (add_request/step) is not merged"),
]

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL = "smol"
SESSION_LEN = 2048
KV_GIB = 0.02  # ~1850 INT8 tokens: smaller than session_len, and the 64 load-test streams must queue for it
ENGINE_ARGS = ["--kv-cache-dtype", "int8", "--session-len", str(SESSION_LEN), "--kv-cache-gib", str(KV_GIB)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(demo_model, tmp_path_factory):
    ws = make_workspace(demo_model, tmp_path_factory.mktemp("serve") / "ws")
    # Fixed INT8 parameters in SmolLM2's K/V range (|x| <= ~30): a real quantized cache, no calibration run.
    write_params(ws / "triton_models" / "weights", "int8", 0.24, 0.0, 0.08, 0.0)
    return ws


@pytest.fixture(scope="module")
def server_process(workspace, tmp_path_factory):
    """The server subprocess, just started (the reference LLM loads meanwhile); yields (proc, url, log).
    Stopped with SIGTERM, and it must exit 0 cleanly."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    cmd = [sys.executable, "-m", "runtime.serve", str(workspace), "--port", str(port), "--api-key", KEY]
    cmd += ["--served-model-name", MODEL, "--disable-access-log", *ENGINE_ARGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        yield proc, url, log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text and "Application shutdown complete" in text, text
        assert "KV cache int8" in text and f"{url}/v1" in text  # the banner and the URL at start-up
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server(server_process):
    """The base URL once /health answers 200."""
    proc, url, log = server_process
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"server not healthy in time:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.25)


@pytest.fixture(scope="module")
def llm(workspace, server_process):
    """The in-process reference, same KV settings (loads while the server starts)."""
    from runtime import LLM

    return LLM(str(workspace), kv_cache_dtype="int8", session_len=SESSION_LEN, kv_cache_gib=KV_GIB)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def greedy(llm, prompt: str, max_tokens: int, **kw):
    from runtime import SamplingParams

    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, **kw))[0].outputs[0]


# -- the official client ---------------------------------------------------------------------------
def test_openai_completion_matches_llm_generate(llm, client):
    prompt = "The Debian project is"
    ref = greedy(llm, prompt, 16)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == len(llm.encode(prompt))

    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)

    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[ref.text[10:14]])
    assert cut.choices[0].text == ref.text[: ref.text.find(ref.text[10:14])] and cut.choices[0].finish_reason == "stop"


def test_openai_chat_matches_llm_generate(llm, client):
    msgs = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is Debian?"},
    ]
    ref = greedy(llm, llm.engine.template.render_messages(msgs), 24)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref.text
    assert [m.id for m in client.models.list().data] == [MODEL]


# -- raw HTTP errors ---------------------------------------------------------------------------------
def post(url, path, body, headers=None):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(f"{url}{path}", headers=auth() if headers is None else headers, timeout=30, **kw)


def check_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def test_errors(server):
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    assert "malformed JSON" in check_error(post(server, "/v1/completions", b'{"prompt": "Hi",'), 400)["message"]
    err = check_error(post(server, "/v1/completions", {**ok, "max_tokens": "two"}), 400)
    assert err["param"] == "max_tokens" and "'two'" in err["message"]
    err = check_error(post(server, "/v1/chat/completions", {"model": MODEL, "messages": "hi"}), 400)
    assert err["param"] == "messages"
    err = check_error(post(server, "/v1/completions", {**ok, "model": "gpt-4"}), 404)
    assert "gpt-4" in err["message"] and err["type"] == "NotFoundError"
    assert check_error(post(server, "/v1/completions", ok, headers={}), 401)["type"] == "AuthenticationError"
    check_error(post(server, "/v1/completions", ok, headers={"Authorization": "Bearer wrong"}), 401)
    check_error(httpx.get(f"{server}/v1/models"), 401)

    # beyond session_len: the numbers are in the message
    err = check_error(post(server, "/v1/completions", {**ok, "max_tokens": SESSION_LEN}), 400)
    assert f"max_tokens {SESSION_LEN}" in err["message"] and f"session_len {SESSION_LEN}" in err["message"], err
    # within session_len but beyond the whole KV pool
    pool = int(float(re.search(r"^kvq_kv_cache_tokens (\S+)$", httpx.get(f"{server}/metrics").text, re.M)[1]))
    assert pool < SESSION_LEN - 64, "the test pool must be smaller than a session"
    err = check_error(post(server, "/v1/completions", {**ok, "max_tokens": pool + 8}), 400)
    assert str(pool + 8) in err["message"], err
    assert post(server, "/v1/completions", ok).status_code == 200  # and the server is fine afterwards


# -- load ------------------------------------------------------------------------------------------
PROMPTS = [
    "The Debian project is",
    "A package manager",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics",
    "Photosynthesis converts",
    "def fibonacci(n):",
    "Paris is the capital of",
    "To compile a kernel, first",
]


def load_request(i: int) -> tuple[str, dict]:
    """Request i of the load test: 8 distinct greedy requests (completions and chat, 6-13 tokens), repeated."""
    prompt, max_tokens = PROMPTS[i % 8], 6 + i % 8
    if i % 2:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens}


async def stream_text(client, url: str, path: str, body: dict, hang_up: bool = False) -> str | None:
    """The streamed text; with hang_up, close the connection after the first content chunk."""
    pieces = []
    async with client.stream(
        "POST", f"{url}{path}", json={**body, "model": MODEL, "temperature": 0, "stream": True}
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"] if "text" in choice else choice["delta"].get("content", ""))
            if hang_up and any(pieces):
                return None
    return "".join(pieces)


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])


def test_64_concurrent_streams_equal_alone_and_free_every_block(server):
    n, hang_ups = 64, set(range(5, 64, 8))  # 8 clients hang up after their first chunk

    async def run() -> tuple[dict, list]:
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(headers=auth(), timeout=120, limits=limits) as c:
            alone = {}
            for i in range(8):  # every distinct request (i and i + 8k are the same), one at a time
                alone[i] = await stream_text(c, server, *load_request(i))
            together = await asyncio.gather(
                *(stream_text(c, server, *load_request(i), hang_up=i in hang_ups) for i in range(n))
            )
            return alone, together

    alone, together = asyncio.run(asyncio.wait_for(run(), 240))
    for i, text in enumerate(together):
        if i in hang_ups:
            assert text is None
        else:
            assert text == alone[i % 8], (i, text, alone[i % 8])

    deadline = time.monotonic() + 30  # aborts of the hung-up streams land within an engine step or two
    while True:
        m = httpx.get(f"{server}/metrics").text
        if metric(m, "kvq_num_requests_running") == 0 and metric(m, "kvq_kv_blocks_used") == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert metric(m, "kvq_num_requests_waiting") == 0 and metric(m, "kvq_kv_blocks_total") > 0
    assert 'kvq_kv_cache_info{block_size="64",kv_dtype="int8"} 1.0' in m
    assert metric(m, 'kvq_requests_finished_total\\{finished_reason="abort"\\}') >= 1
    assert metric(m, "kvq_e2e_request_latency_seconds_count") >= n - len(hang_ups)
