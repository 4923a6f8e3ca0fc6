"""The CLIP tokenizer against Hugging Face `transformers.CLIPTokenizer` on the same vocabulary."""

import json

import numpy as np
import pytest

from mtkd_jax.clip.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

_PIECES = [
    "'s",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "'S",
    "'T",
    "''",
    "’s",
    "don't",
    "I'M",
    "&amp;",
    "&lt;b&gt;",
    "&#39;",
    "&quot;",
    "&nbsp;",
    "<|endoftext|>",
    "<|startoftext|>",
    "<|ENDOFTEXT|>",
    "<|end",
    "of",
    "...",
    "!?",
    "--",
    "(a)",
    "[1]",
    "{x}",
    "#",
    "@user",
    "$5",
    "%",
    "C++",
    "e.g.",
    "3.14",
    "1,000",
    "2024-01-31",
    "10:30",
    "½",
    "²",
    "٣",
    "Ⅻ",
    "café",
    "naïve",
    "Ærø",
    "straße",
    "İstanbul",
    "ΟΔΟΣ",
    "Σ",
    "Привет",
    "مرحبا",
    "שלום",
    "नमस्ते",
    "ภาษาไทย",
    "猫",
    "写真",
    "日本語のテキスト",
    "한국어",
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "🇫🇷",
    "e\u0301",
    "A\u030a",
    "ﬁ",
    "Ｆｕｌｌｗｉｄｔｈ",
    "x\u200by",
    "\ufeff",
    "\u00ad",
    "a\x1cb",
]
_SPACES = [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\x0b", "\x85"]
_RANGES = [(0x21, 0x7E), (0xA1, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
           (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
           (0x1F300, 0x1F6FF), (0x300, 0x36F), (0x2000, 0x206F)]  # fmt: skip


def _generated_texts(tokenizer, count=300, seed=0):
    """Random texts mixing vocabulary words, the pieces above, random code points and spaces."""
    rng = np.random.default_rng(seed)
    vocab_words = [tokenizer.decode([i]) for i in rng.integers(0, tokenizer.vocab_size - 2, 400)]
    texts = []
    for index in range(count):
        parts = []
        for _ in range(rng.integers(1, 25)):
            kind = rng.integers(0, 4)
            if kind == 0:
                word = vocab_words[rng.integers(len(vocab_words))]
                parts.append(word.upper() if rng.random() < 0.2 else word)
            elif kind == 1:
                parts.append(_PIECES[rng.integers(len(_PIECES))])
            elif kind == 2:
                low, high = _RANGES[rng.integers(len(_RANGES))]
                codes = rng.integers(low, high + 1, rng.integers(1, 6))
                parts.append("".join(chr(code) for code in codes))
            else:
                parts.append(str(rng.integers(0, 10**6)))
            parts.append(_SPACES[rng.integers(len(_SPACES))] if rng.random() < 0.8 else "")
        text = "".join(parts)
        if index % 25 == 0:
            text = " ".join([text] * 12)  # far beyond 77 tokens
        texts.append(text)
    promptkd = ["X X X X Abyssinian.", "X X X X great pyrenees.", "X X X X Boeing 737-800."]
    return texts + promptkd + ["", " ", "\n", "a photo of a cat.", "A PHOTO OF A DOG!"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    ours = CLIPTokenizer()
    directory = tmp_path_factory.mktemp("clip_vocab")
    ours.save_assets(directory)
    reference = transformers.CLIPTokenizer.from_pretrained(str(directory))
    return ours, reference, directory


def test_standard_vocabulary_has_openai_size_and_special_ids(tokenizers):
    ours, reference, _ = tokenizers
    assert ours.vocab_size == 49408 == len(reference)
    assert ours.sot_token_id == 49406 == reference.bos_token_id
    assert ours.eot_token_id == 49407 == reference.eos_token_id


def test_encode_matches_transformers_on_generated_texts(tokenizers):
    ours, reference, _ = tokenizers
    texts = _generated_texts(ours)
    assert len(texts) > 300
    expected = reference(texts, add_special_tokens=False)["input_ids"]
    mismatches = [
        (text, ours.encode(text), ids)
        for text, ids in zip(texts, expected, strict=True)
        if ours.encode(text) != ids
    ]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[0]!r:.600}"


@pytest.mark.parametrize("context_length", [77, 8])
def test_tokenize_gives_openai_layout_of_transformers_ids(tokenizers, context_length):
    ours, reference, _ = tokenizers
    texts = _generated_texts(ours, count=60, seed=1)
    expected = np.zeros((len(texts), context_length), np.int64)
    for row, ids in enumerate(reference(texts, add_special_tokens=False)["input_ids"]):
        ids = [reference.bos_token_id, *ids[: context_length - 2], reference.eos_token_id]
        expected[row, : len(ids)] = ids
    tokens = ours.tokenize(texts, context_length=context_length)
    assert tokens.dtype == np.int32 and tokens.shape == (len(texts), context_length)
    np.testing.assert_array_equal(tokens, expected)


def test_truncation_keeps_end_of_text_and_can_be_refused(tokenizers):
    ours, reference, _ = tokenizers
    long_text = "a photo of a very long and winding road " * 20
    row = ours.tokenize(long_text)[0]
    assert row[0] == ours.sot_token_id and row[-1] == ours.eot_token_id
    hf_row = reference(long_text, truncation=True, max_length=77)["input_ids"]
    np.testing.assert_array_equal(row, hf_row)
    with pytest.raises(ValueError, match="context_length=77"):
        ours.tokenize(long_text, truncate=False)
    with pytest.raises(ValueError, match="context_length"):
        ours.tokenize("a", context_length=1)


def test_pooling_position_is_the_same_for_zero_and_eot_padding(tokenizers):
    ours, reference, _ = tokenizers
    texts = ["a photo of a cat.", "a", "an image of a large red fire truck on a street"]
    ours_rows = ours.tokenize(texts)
    hf_rows = np.asarray(reference(texts, padding="max_length", max_length=77)["input_ids"])
    np.testing.assert_array_equal(ours_rows.argmax(-1), hf_rows.argmax(-1))


def test_decode_matches_transformers(tokenizers):
    ours, reference, _ = tokenizers
    for text in _generated_texts(ours, count=40, seed=2):
        ids = reference(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == reference.decode(ids)
        with_specials = [ours.sot_token_id, *ids, ours.eot_token_id]
        assert ours.decode(with_specials, skip_special_tokens=True) == reference.decode(
            with_specials, skip_special_tokens=True
        )


def test_from_directory_reads_saved_assets_and_tokenizer_json(tokenizers, tmp_path):
    ours, reference, directory = tokenizers
    texts = _generated_texts(ours, count=30, seed=3)
    reloaded = CLIPTokenizer.from_directory(directory)
    reference.save_pretrained(tmp_path)  # Hugging Face's own layout
    only_json = tmp_path / "only_json"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text())
    from_json = CLIPTokenizer.from_directory(only_json)
    for text in texts:
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert reloaded.encode(text) == expected
        assert from_json.encode(text) == expected
    assert json.loads((directory / "vocab.json").read_text()) == reference.get_vocab()


def test_keras_hub_tokenizer_and_its_saved_assets_agree(tokenizers, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    ours, _, directory = tokenizers
    vocab = json.loads((directory / "vocab.json").read_text())
    merges = (directory / "merges.txt").read_text().split("\n")[1:-1]
    reference = keras_hub.tokenizers.CLIPTokenizer(vocabulary=vocab, merges=merges)
    (tmp_path / "assets").mkdir()
    reference.save_assets(str(tmp_path / "assets"))  # vocabulary.json + merges.txt
    reloaded = CLIPTokenizer.from_directory(tmp_path / "assets")
    for text in ["a photo of a cat.", "It's  CAFÉ 123 😀", "ΟΔΟΣ 猫の写真", "x" * 300]:
        expected = [int(i) for i in np.asarray(reference(text))]
        assert ours.encode(text) == expected
        assert reloaded.encode(text) == expected


def test_small_custom_vocabulary_matches_transformers(tmp_path):
    from mtkd_jax.clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = [("a", "b"), ("ab", "c</w>"), ("c", "a"), ("ca", "b</w>"), ("a", "a")]
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    for first, second in merges:
        vocab[first + second] = len(vocab)
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab, merges)
    tokenizer.save_assets(tmp_path)
    reference = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in ["abc cab aaaa aaa ab", "abcabc", "ca ab c a", "zzz é"]:
        assert tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_invalid_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="No CLIP tokenizer files"):
        CLIPTokenizer.from_directory(tmp_path)
    with pytest.raises(TypeError, match="must be a str"):
        CLIPTokenizer().encode(3)
    with pytest.raises(ValueError, match="special token"):
        CLIPTokenizer({"a": 0}, [])
    with pytest.raises(ValueError, match="both"):
        CLIPTokenizer({"a": 0})
