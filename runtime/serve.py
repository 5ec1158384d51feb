"""`python -m runtime.serve WORKSPACE`: an OpenAI-compatible HTTP server on the quantized-cache engine.

    python -m runtime.serve demo_out/workspace --kv-cache-dtype int8 --kv-cache-gib 1 --port 23333

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (503 once the
engine loop has died), GET /metrics (Prometheus text). Request and response shapes live in
runtime/protocol.py.

Threads: one thread owns the engine (`runtime.engine_loop.EngineLoop`: add / abort / step,
detokenization, stop strings); the HTTP handlers here run on the asyncio loop, submit to it, and get
text deltas back on per-request asyncio queues through loop.call_soon_threadsafe (`Run`). A client
that disconnects (mid-stream, or while waiting for a non-streamed answer) aborts its request. If the
engine loop dies, requests in flight get a 500, new ones a 503, and /health says 503.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import sys
import weakref
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime import protocol as P
from runtime.engine_loop import Accepted, Delta, EngineLoop, Failed, Metrics, Submission
from runtime.protocol import APIError
from runtime.sampling import SamplingParams

DEFAULT_PORT = 23333  # LMDeploy's api_server port


# -- the asyncio side of one HTTP request ---------------------------------------------------------
class Run:
    """One HTTP request's engine requests (one per prompt) and the events coming back for them."""

    def __init__(self, loop: EngineLoop, base_id: str, n: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.aio = asyncio.get_running_loop()
        self.ids = [base_id] if n == 1 else [f"{base_id}-{i}" for i in range(n)]
        self.done = [False] * n
        self.backlog: list = []
        self.usage = [(0, 0)] * n

    async def start(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Submit every prompt; raises the first rejection (after aborting the accepted ones)."""
        for i, ids in enumerate(prompts):
            self.loop.submit(Submission(self.ids[i], i, ids, params, self.deliver))
        answered, error = 0, None
        while answered < len(prompts):
            ev = await self.queue.get()
            if isinstance(ev, Accepted | Failed):
                answered += 1
                if isinstance(ev, Failed):
                    self.done[ev.index] = True
                    error = error or ev.error
            else:  # an early prompt's output while later ones are still being admitted
                self.backlog.append(ev)
        if error is not None:
            self.abort_unfinished()
            raise error

    async def events(self) -> AsyncIterator[Delta | Failed]:
        while self.backlog or not all(self.done):
            ev = self.backlog.pop(0) if self.backlog else await self.queue.get()
            if isinstance(ev, Failed):
                self.done[ev.index] = True
            elif ev.finished:
                self.done[ev.index] = True
                self.usage[ev.index] = (ev.prompt_tokens, ev.completion_tokens)
            yield ev

    def deliver(self, ev) -> None:
        """Called from the engine thread."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self.aio.call_soon_threadsafe(self.queue.put_nowait, ev)

    def abort_unfinished(self) -> None:
        for rid, done in zip(self.ids, self.done, strict=True):
            if not done:
                self.loop.abort(rid)
        self.done = [True] * len(self.done)

    def total_usage(self) -> dict:
        return P.usage(sum(u[0] for u in self.usage), sum(u[1] for u in self.usage))

    async def collect(self, request) -> tuple[list[str], list[str | None]]:
        """All text and finish reasons; the requests are aborted if the client goes away first."""
        texts: list[list[str]] = [[] for _ in self.ids]
        reasons: list[str | None] = [None] * len(self.ids)

        async def consume() -> None:
            async for ev in self.events():
                if isinstance(ev, Failed):
                    raise ev.error
                texts[ev.index].append(ev.text)
                reasons[ev.index] = ev.finish_reason if ev.finished else None

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            self.abort_unfinished()
        if task.cancelled():
            raise _ClientGone
        task.result()  # re-raises a Failed's error
        return ["".join(t) for t in texts], reasons


class _ClientGone(Exception):
    pass


async def _disconnected(request) -> None:
    """Returns when the client closes the connection (the body was read already, so the next ASGI
    message can only be http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app --------------------------------------------------------------------------------------
def create_app(engine, *, model_name: str, api_key: str | None = None, root: str | None = None):
    """The FastAPI app serving `engine`; its lifespan starts and stops the engine thread."""
    metrics = Metrics()
    loop = EngineLoop(engine, metrics)
    metrics.loop = loop
    tok, template, cfg = engine.tokenizer, engine.template, engine.config
    created = P.now()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.shutdown()

    app = FastAPI(title="kvq", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine_loop = loop

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return JSONResponse(
            P.error_body(str(e.detail), P.ERROR_TYPES.get(e.status_code, "Error"), None, e.status_code), e.status_code
        )

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(header[7:].strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key")

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server has `{model_name}`).", "model")

    def check_engine() -> None:
        if not loop.healthy:
            raise APIError(503, f"engine loop is not running: {loop.error!r}")

    def encode(prompt: str | list[int], where: str) -> list[int]:
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_special_tokens=False)
            ids = [cfg.start_id, *ids] if template.add_bos else ids
        else:
            for j, t in enumerate(prompt):
                if not 0 <= t < cfg.vocab_size:
                    raise APIError(400, f"{where}[{j}] = {t}: token id out of range [0, {cfg.vocab_size})", "prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, f"{where}: the prompt is empty (0 tokens)", where.split("[")[0])
        return ids

    def stream(run: Run, chunk: Callable[[Delta], dict], head: list[dict], usage_obj: str, include_usage: bool):
        created_at = P.now()

        async def body():
            try:
                for c in head:
                    yield P.sse(c)
                async for ev in run.events():
                    if isinstance(ev, Failed):  # the status line is sent already: the error goes in-stream
                        yield P.sse(ev.error.body())
                        break
                    c = chunk(ev)
                    if include_usage:
                        c["usage"] = None
                    yield P.sse(c)
                else:
                    if include_usage:
                        yield P.sse(P.usage_chunk(run.ids[0], created_at, model_name, usage_obj, run.total_usage()))
                yield P.sse("[DONE]")
            finally:  # also on cancellation when the client disconnects: free the blocks
                run.abort_unfinished()

        response = StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        # A client gone before the first chunk leaves body() unstarted, so its finally never runs: abort
        # when the response is dropped instead (a no-op once everything finished).
        weakref.finalize(response, run.abort_unfinished)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req = P.parse_request(P.CompletionRequest, await request.body())
        check_model(req.model)
        check_engine()
        prompts = req.prompts()
        ids = [encode(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]") for i, p in enumerate(prompts)]
        params = req.sampling_params(req.max_tokens or P.DEFAULT_COMPLETION_MAX_TOKENS)
        run = Run(loop, P.new_id("cmpl"), len(ids))
        await run.start(ids, params)
        if req.stream:
            rid, t0 = run.ids[0], P.now()
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(
                run,
                lambda ev: P.completion_chunk(rid, t0, model_name, ev.index, ev.text, ev.finish_reason),
                [],
                "text_completion",
                include,
            )
        try:
            texts, reasons = await run.collect(request)
        except _ClientGone:
            return Response(status_code=499)
        return P.completion_response(run.ids[0], P.now(), model_name, texts, reasons, run.total_usage())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = P.parse_request(P.ChatCompletionRequest, await request.body())
        check_model(req.model)
        check_engine()
        try:
            text = template.render_messages(req.conversation())
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        ids = encode(text, "messages")
        max_tokens = req.requested_max_tokens
        if max_tokens is None:  # vLLM's default: whatever room the session (and the pool) leaves
            room = min(engine.session_len, loop.snapshot.kv_cache_tokens)
            max_tokens = room - len(ids)
            if max_tokens < 1:
                raise APIError(
                    400,
                    f"the conversation is {len(ids)} tokens; it leaves no room to answer in "
                    f"session_len {engine.session_len} / KV pool {loop.snapshot.kv_cache_tokens} tokens",
                    "messages",
                )
        params = req.sampling_params(max_tokens, extra_stop=template.stop_words)
        run = Run(loop, P.new_id("chatcmpl"), 1)
        await run.start([ids], params)
        rid = run.ids[0]
        if req.stream:
            t0 = P.now()
            include = bool(req.stream_options and req.stream_options.include_usage)
            head = [P.chat_chunk(rid, t0, model_name, {"role": "assistant", "content": ""}, None)]
            if include:
                head[0]["usage"] = None
            return stream(
                run,
                lambda ev: P.chat_chunk(rid, t0, model_name, {"content": ev.text} if ev.text else {}, ev.finish_reason),
                head,
                "chat.completion.chunk",
                include,
            )
        try:
            texts, reasons = await run.collect(request)
        except _ClientGone:
            return Response(status_code=499)
        return P.chat_response(rid, P.now(), model_name, texts[0], reasons[0], run.total_usage())

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return P.models_list(model_name, root or model_name, engine.session_len, created)

    @app.get("/health")
    async def health():
        if loop.healthy:
            return {"status": "ok"}
        return JSONResponse({"status": f"engine loop is not running: {loop.error!r}"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from runtime.engine import add_engine_arguments

    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n")[0])
    p.add_argument("workspace", help="workspace directory written by python -m deploy")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 = every interface (default: 127.0.0.1)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument(
        "--api-key",
        default=os.environ.get("KVQ_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $KVQ_API_KEY, else no key)",
    )
    p.add_argument("--served-model-name", help="the model name clients send (default: the workspace path)")
    add_engine_arguments(p)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: info)",
    )
    p.add_argument("--disable-access-log", action="store_true", help="no uvicorn line per HTTP request (default: off)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runtime import distributed
    from runtime.engine import Engine, engine_kwargs

    if distributed.is_worker():  # torchrun rank > 0: rank 0 serves HTTP and sends the forward passes
        return distributed.run_worker(args.workspace, **engine_kwargs(args))
    try:
        engine = Engine(args.workspace, **engine_kwargs(args))
    except (ValueError, FileNotFoundError) as e:  # WorkspaceError / bad option: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or args.workspace
    app = create_app(engine, model_name=name, api_key=args.api_key, root=args.workspace)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(engine.banner())
    print(
        f"serving {name!r} on http://{host}:{args.port}/v1 (OpenAI API; /health, /metrics)"
        f"{'; API key required' if args.api_key else ''} - Ctrl-C to stop",
        flush=True,
    )
    return run_server(app, args.host, args.port, log_level=args.log_level, access_log=not args.disable_access_log)


class _Stop(BaseException):
    """Raised by our SIGTERM handler, which uvicorn restores and re-raises after its graceful shutdown."""


def run_server(app, host: str, port: int, *, log_level: str = "info", access_log: bool = True) -> int:
    """Serve until Ctrl-C or SIGTERM, then shut down cleanly: stop listening, stop the engine thread
    (requests still running end at once with a 503 error, in-stream for streams, so no connection is left
    hanging), close the connections, exit 0."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # uvicorn would wait for open connections before the lifespan's shutdown; a long stream
            # would then be cut without its [DONE]. Stopping the engine first ends every request properly.
            await asyncio.to_thread(app.state.engine_loop.shutdown)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=10
    )
    server = Server(config)

    def stop(signum, frame):
        raise _Stop

    # uvicorn handles the signal itself, then re-raises it with the handler it found: these end the
    # process quietly once everything has shut down (instead of a traceback or death by SIGTERM).
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
