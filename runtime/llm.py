"""The vLLM-shaped Python API over the engine:

    from runtime import LLM, SamplingParams
    llm = LLM("./workspace", kv_cache_dtype="int8", kv_cache_gib=1)  # auto | fp16 | int8 | fp8 | fp8_e4m3 | fp8_e5m2
    # | int8_per_token_head | fp8_per_token_head | int4_per_token_head (online scales, no files; kv_rotation=auto|on|off)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text, out[0].outputs[0].finish_reason)
    print(llm.kv_cache_tokens, llm.num_kv_blocks)          # what the KV budget holds

Prompts are raw text (tokenized with BOS when the chat template says add_bos) or token-id lists;
any number of them go through the engine's scheduler (as many at once as the KV pool holds).
Engine options are keyword arguments (`kv_cache_gib`, `cache_max_entry_count`, `block_size`,
`max_batch_size`, `max_prefill_token_num`, `session_len`, `kv_granularity`, ...; see `runtime.engine`). `token_ids` holds the generated tokens only (an EOS or
stop token included, as vLLM does); stop strings cut the text and end that sequence. The heavy
engine (transformers, the model) is imported only when an LLM is built. Engine options pass through,
e.g. `LLM(ws, kv_cache_dtype="fp8", kv_granularity="tensor")` (tensor | head: which scale files to load;
default config.ini's kv_granularity).

`LLM(ws, tensor_parallel_size=N)` on a workspace deployed with `--tp N` runs one process per TP rank: this
one is rank 0, the others are started here and stopped by `llm.shutdown()` (or leaving a `with LLM(...)`
block, or the end of the program); see `runtime.distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.detokenize import IncrementalDetokenizer, StopStringChecker
from runtime.sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # 'stop' (EOS, stop token or stop string) | 'length' (max_tokens)


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """Load a workspace once; generate for one or many prompts."""

    def __init__(
        self,
        workspace: str,
        kv_cache_dtype: str = "auto",
        calculate_kv_scales: bool = False,
        dtype: str = "auto",
        device: str = "cpu",
        tensor_parallel_size: int | None = None,
        **engine_kwargs,
    ) -> None:
        from runtime.engine import Engine

        self.engine = Engine(
            workspace,
            kv_cache_dtype=kv_cache_dtype,
            calculate_kv_scales=calculate_kv_scales,
            dtype=dtype,
            device=device,
            tensor_parallel_size=tensor_parallel_size,
            **engine_kwargs,
        )
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do in one process). Idempotent."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV pool holds (blocks x block_size)."""
        return self.engine.kv_cache_tokens

    @property
    def num_kv_blocks(self) -> int:
        return self.engine.num_kv_blocks

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.engine.config.start_id, *ids] if self.engine.template.add_bos else ids

    def generate(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]

        # Per sequence with stop strings: stream the new token's text into the stop-string checker
        # (re-decoding the whole output every step would cost O(n^2) decodes per sequence).
        watch = {
            b: (IncrementalDetokenizer(self.tokenizer), StopStringChecker(p.stop))
            for b, p in enumerate(params)
            if p.stop
        }

        def hit_stop(b: int, tokens: list[int]) -> bool:  # called once per generated token, in order
            if b not in watch:
                return False
            detok, checker = watch[b]
            return checker.feed(detok.add(tokens[-1]))[1]

        outs = self.engine.generate(ids, params, stop_check=hit_stop)
        results = []
        for b, toks in enumerate(outs):
            text, cut = _cut(self._decode(toks), params[b].stop or [])
            ended = cut or (len(toks) < params[b].max_tokens) or self.engine.stops(toks[-1], params[b])
            done = CompletionOutput(0, text, toks, "stop" if ended else "length")
            results.append(RequestOutput(texts[b], ids[b], [done]))
        return results

    def _decode(self, tokens: list[int]) -> str:
        """The output text, streamed through the detokenizer so that a character cut short by max_tokens is
        dropped (finish) rather than ending the text with U+FFFD."""
        detok = IncrementalDetokenizer(self.tokenizer)
        return "".join(detok.add(t) for t in tokens) + detok.finish()


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one occurred."""
    checker = StopStringChecker(stops)
    kept, stopped = checker.feed(text)
    return kept + checker.flush(), stopped
