"""`python -m runtime.chat WORKSPACE`: a multi-round chat REPL on a workspace (docs/formats.md §5).

Behaviour follows the 2023 LMDeploy `turbomind.chat`:
- input ends on an empty line (prompt "double enter to end input >>> "); `exit` quits;
  `end` closes the session (frees its KV blocks, resets the step) and starts a new one;
- each turn sends only its own tokens (template.get_prompt(text, sequence_start) → tokenizer,
  BOS on the first turn when the template asks); the KV cache keeps the history;
- a turn that would overflow session_len (history + input + max new tokens) is refused with a
  warning telling the user to type `end`;
- the answer streams token by token through the incremental detokenizer (no broken UTF-8),
  cut at the template's stop words; Ctrl-C stops the answer and returns to the prompt, keeping
  the session; EOF on stdin quits (a last unterminated input is still answered).

`ChatSession` is the REPL over any text streams (tests drive it with io.StringIO); `main` only
parses arguments and builds the engine. Tensor parallelism: `torchrun --nproc-per-node N -m runtime.chat WS`
on a workspace deployed with `--tp N`; rank 0 runs the chat, the other ranks only `run_worker`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from runtime import distributed
from runtime.detokenize import IncrementalDetokenizer, StopStringChecker
from runtime.engine import RequestError, add_engine_arguments, engine_kwargs
from runtime.sampling import SamplingParams

PROMPT = "double enter to end input >>> "
DEFAULT_MAX_NEW_TOKENS = 512


class ChatSession:
    """The REPL state: the engine, the current session, the sampling settings and the text streams."""

    def __init__(
        self, engine, params: SamplingParams, *, stdin: TextIO, stdout: TextIO, stderr: TextIO | None = None
    ) -> None:
        self.engine = engine
        self.params = params
        self.stdin, self.stdout = stdin, stdout
        self.stderr = stderr if stderr is not None else stdout
        self.template = engine.template
        self.tokenizer = engine.tokenizer
        self.stop_ids = set(params.stop_token_ids or ()) | ({engine.config.end_id} if not params.ignore_eos else set())
        self.session = engine.new_session()
        self.at_eof = False

    # -- input -----------------------------------------------------------------------------------
    def read_input(self) -> str | None:
        """Lines up to the first empty one, joined with newlines; None at EOF with nothing typed."""
        self.stdout.write("\n" + PROMPT)
        self.stdout.flush()
        lines: list[str] = []
        while True:
            line = self.stdin.readline()
            if line == "":  # EOF
                self.at_eof = True
                return "\n".join(lines) if lines else None
            line = line.rstrip("\r\n")
            if line == "":
                return "\n".join(lines)
            lines.append(line)

    def encode_turn(self, text: str) -> list[int]:
        """Token ids of one user turn; the first turn of a session gets the system block (and BOS)."""
        sequence_start = self.session.num_tokens == 0
        prompt = self.template.get_prompt(text, sequence_start)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if sequence_start and self.template.add_bos:
            ids = [self.engine.config.start_id, *ids]
        return ids

    # -- commands --------------------------------------------------------------------------------
    def end_session(self) -> None:
        self.engine.end_session(self.session)
        self.session = self.engine.new_session()
        self._say("session ended: its KV cache was freed; a new session starts")

    def run(self) -> int:
        """The REPL loop; returns the exit code."""
        while True:
            try:
                text = self.read_input()
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the typed input, like Python's REPL
                self.stdout.write("\n")
                continue
            if text is None:
                self.stdout.write("\n")
                return 0
            command = text.strip()
            if command == "exit":
                return 0
            if command == "end":
                self.end_session()
            elif command:
                self.turn(text)
            if self.at_eof:  # input piped without a final empty line: answered, then quit
                self.stdout.write("\n")
                return 0

    # -- one turn --------------------------------------------------------------------------------
    def turn(self, text: str) -> str:
        """Send one user turn and stream the answer to stdout; returns the printed answer text."""
        ids = self.encode_turn(text)
        try:
            tokens = self.engine.stream(self.session, ids, self.params)
        except RequestError as e:
            self._say(
                f"warning: this turn does not fit in the session ({e}). Type `end` to close the session "
                "and start a new one."
            )
            return ""
        detok = IncrementalDetokenizer(self.tokenizer, ids)
        stops = StopStringChecker(self.params.stop)
        printed: list[str] = []
        stopped = interrupted = False
        try:
            with deferred_ctrl_c() as ctrl_c:
                for token in tokens:
                    if token in self.stop_ids:  # EOS / stop token: not part of the answer text
                        break
                    piece, stopped = stops.feed(detok.add(token))
                    self._emit(piece, printed)
                    if stopped:
                        break
                    if ctrl_c.requested:
                        raise KeyboardInterrupt
            if not stopped:
                self._emit(stops.feed(detok.finish())[0], printed)  # an incomplete last character is dropped
                self._emit(stops.flush(), printed)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:  # stop the engine's generator; the session keeps what was yielded
                close()
        self.stdout.write("\n")
        if interrupted:
            self._say("[interrupted: answer stopped; the session is kept]")
        self.stdout.flush()
        return "".join(printed)

    def _emit(self, piece: str, printed: list[str]) -> None:
        if piece:
            printed.append(piece)
            self.stdout.write(piece)
            self.stdout.flush()

    def _say(self, line: str) -> None:
        self.stderr.write(line + "\n")
        self.stderr.flush()


class _CtrlC:
    requested = False


@contextlib.contextmanager
def deferred_ctrl_c() -> Iterator[_CtrlC]:
    """During generation a first Ctrl-C only sets a flag, checked between tokens, so the interrupt never lands
    inside the engine's forward pass (the answer stops after the current token); a second one raises at once.
    Off the main thread (where signal handlers cannot be set) KeyboardInterrupt behaves as usual."""
    state = _CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame) -> None:
        if state.requested:
            raise KeyboardInterrupt
        state.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def sampling_params(args: argparse.Namespace, engine) -> SamplingParams:
    """Command-line sampling options over the chat template's defaults."""
    t = engine.template

    def pick(value, default):
        return default if value is None else value

    return SamplingParams(
        temperature=pick(args.temperature, t.temperature),
        top_p=pick(args.top_p, t.top_p),
        top_k=pick(args.top_k, t.top_k),
        repetition_penalty=pick(args.repetition_penalty, t.repetition_penalty),
        max_tokens=args.max_new_tokens,
        stop=list(t.stop_words) or None,
        stop_token_ids=t.stop_token_ids(engine.tokenizer) or None,
        seed=args.seed,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__.split("\n")[0])
    p.add_argument("workspace", help="workspace directory written by python -m deploy")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the chat template's)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the chat template's)")
    p.add_argument("--top-k", type=int, help="-1 or 0 = off (default: the chat template's)")
    p.add_argument("--repetition-penalty", type=float, help="1.0 = off (default: the chat template's)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens per answer at most (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument(
        "--seed", type=int, help="sampling seed for reproducible answers; each turn restarts it (default: none)"
    )
    # one conversation at a time: the pool holds max_batch_size x session_len tokens at most
    add_engine_arguments(p, max_batch_size_default=1)
    return p.parse_args(argv)


def main(
    argv: list[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    args = parse_args(argv)
    if distributed.is_worker():  # torchrun rank > 0: rank 0 owns the chat and sends the forward passes
        return distributed.run_worker(args.workspace, **engine_kwargs(args))
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    from runtime.engine import Engine

    try:
        engine = Engine(args.workspace, **engine_kwargs(args))
        params = sampling_params(args, engine)
    except (ValueError, FileNotFoundError, distributed.TPError) as e:  # WorkspaceError is a ValueError: one line
        stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:  # while the workspace loads; the chat itself handles Ctrl-C
        stderr.write("interrupted: while loading the workspace, before the chat started (chat writes no files)\n")
        return 130
    stdout.write(engine.banner() + "\n")
    stdout.write(
        f"chat template {engine.template.name}; temperature {params.temperature}, top_p {params.top_p}, "
        f"top_k {params.top_k}, repetition_penalty {params.repetition_penalty}, "
        f"max_new_tokens {params.max_tokens}, session_len {getattr(engine, 'session_len', '?')}\n"
    )
    try:
        return ChatSession(engine, params, stdin=stdin, stdout=stdout, stderr=stderr).run()
    except distributed.TPError as e:  # a tensor-parallel rank died: the message names it
        stderr.write(f"error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
