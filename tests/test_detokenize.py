"""Incremental detokenization (real SmolLM2 byte-level BPE and a SentencePiece-style byte-fallback
tokenizer) against tokenizer.decode of the whole sequence, and stop strings in streamed text."""

from __future__ import annotations

import json

import pytest

from runtime.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringChecker

TEXTS = [
    "Héllo wörld! Ça va? naïve café — “quotes” … ok",
    "Emoji: 😀👍🏽 🇫🇷 family 👨‍👩‍👧 end",
    "日本語のテキスト, 世界. 中文测试：你好！한국어 텍스트",
    "Mixed: résumé 😀日本 x\nnew line\ttab   spaces  ünïcödé ¿qué? 🙂",
    "plain ascii text with punctuation: a, b. c! (d) [e] {f} 123 4.5",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A tiny SentencePiece-style tokenizer: '▁' word prefixes, byte fallback for unseen characters,
    Llama's decoder chain (the leading space of a decoded span is stripped)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Hello world, this is a small test corpus for a tiny tokenizer.",
        "The quick brown fox jumps over the lazy dog. plain ascii text with punctuation!",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60)
    )
    spec = json.loads(tok.to_str())
    for b in range(256):  # SentencePiece byte-fallback pieces <0x00> .. <0xFF>
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def stream(tokenizer, ids, context=()):
    detok = IncrementalDetokenizer(tokenizer, context)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_streaming_matches_full_decode(smollm2_tokenizer, text):
    tok = smollm2_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    # one-token-at-a-time decoding would have produced broken pieces for these texts
    if any(ord(c) > 127 for c in text):
        assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback_and_leading_spaces(sp_tokenizer, text):
    tok = sp_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    if any(ord(c) > 127 for c in text):  # characters outside the tiny vocab go through byte fallback
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    # decoding token by token would lose every word's leading space
    assert "".join(tok.decode([i]) for i in ids).count(" ") < tok.decode(ids).count(" ")


@pytest.mark.parametrize("fixture", ["smollm2_tokenizer", "sp_tokenizer"])
def test_context_gives_first_token_its_space(request, fixture):
    tok = request.getfixturevalue(fixture)
    prompt, answer = "Hello world,", " the quick fox 😀 jumps"
    all_ids = tok.encode(prompt + answer, add_special_tokens=False)
    n = len(tok.encode(prompt, add_special_tokens=False))
    assert tok.decode(all_ids[:n]) == prompt  # the split falls on a token boundary
    pieces = stream(tok, all_ids[n:], context=all_ids[:n])
    assert "".join(pieces) == tok.decode(all_ids)[len(prompt) :] == answer


def test_special_tokens_skipped_or_kept(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hi 😀<|im_end|>", add_special_tokens=False)
    assert "".join(stream(tok, ids)) == "Hi 😀"
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(detok.add(i) for i in ids) == "Hi 😀<|im_end|>"


def test_incomplete_utf8_held_back_until_flush(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("a😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    out = [detok.add(i) for i in ids[:-1]]  # the emoji is cut short
    assert "".join(out) == "a"
    assert detok.flush() == tok.decode(ids[:-1])[1:]  # the broken tail only comes out at the end


@pytest.mark.parametrize("text", ["Hi 😀", "日本語", "Ça 👍🏽", "你好世界"])
def test_finish_drops_a_character_cut_short(smollm2_tokenizer, text):
    """max_tokens may stop in the middle of a multi-byte character: finish() drops its bytes (vLLM does the
    same) instead of ending the text with U+FFFD; complete text comes out whole."""
    tok = smollm2_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    for k in range(1, len(ids) + 1):
        detok = IncrementalDetokenizer(tok)
        out = "".join(detok.add(i) for i in ids[:k]) + detok.finish()
        assert REPLACEMENT_CHAR not in out
        assert out == tok.decode(ids[:k]).rstrip(REPLACEMENT_CHAR)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) + detok.finish() == text


def feed_all(stop, chunks):
    checker = StopStringChecker(stop)
    out, stopped = [], False
    for c in chunks:
        text, stopped = checker.feed(c)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(checker.flush())
    return out, stopped


def test_stop_string_across_pieces():
    out, stopped = feed_all(["<|im_end|>"], ["Hello", " wor", "ld<|im", "_e", "nd|>", "after"])
    assert stopped and "".join(out) == "Hello world"
    assert out[2] == "ld"  # '<|im' held back while it could still become the stop string
    out, stopped = feed_all(["###", "User:"], ["a #", "# b", " Us", "er: c"])
    assert stopped and "".join(out) == "a ## b "


def test_stop_prefix_released_when_it_diverges():
    out, stopped = feed_all(["</s>"], ["x </", "p> y"])
    assert not stopped and out[0] == "x " and "".join(out) == "x </p> y"
    out, stopped = feed_all(["abc"], ["ab"])  # generation ended inside a prefix: flushed
    assert not stopped and out == ["", "ab"]
    out, stopped = feed_all(None, ["a", "b"])
    assert out == ["a", "b", ""] and not stopped


def test_earliest_stop_string_wins():
    out, stopped = feed_all(["END", "STOP"], ["one STOP two END"])
    assert stopped and out == ["one "]
