"""The OpenAI CLIP byte-pair-encoding tokenizer: keras-hub's `CLIPTokenizer` on CLIP's vocabulary.

The byte-pair encoding itself is keras-hub's (`keras_hub.tokenizers.CLIPTokenizer`). Its ids are
identical to Hugging Face `transformers.CLIPTokenizer` on the same vocabulary (the tests compare
them on a few hundred generated texts, PromptKD's "X X X X {class}." prompts and texts far past
77 tokens). What this module adds around it: the vocabulary files users have (OpenAI's gzipped
merges, Hugging Face's `vocab.json` + `merges.txt` or `tokenizer.json`, a keras-hub preset's
`vocabulary.json`), OpenAI's `[sot, ids…, eot, 0…]` layout with truncation that keeps the
end-of-text token, and decoding. keras-hub (and TensorFlow, which it runs on) is imported on the
first encoding, so importing this module loads neither.

OpenAI's own tokenizer cleans text with `ftfy.fix_text` and `html.unescape` first; this one does
not (neither does `transformers`), so texts with mojibake, curly quotes or HTML entities such as
`&amp;` can get different ids from `clip.tokenize`. Class-name prompts are unaffected.

The standard vocabulary (`bpe_simple_vocab_16e6.txt.gz`, 49,408 tokens) ships in
`mtkd_jax/clip/assets/`, so `CLIPTokenizer()` works offline.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Sequence

import numpy as np

from mtkd_jax.errors import InputError

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
STANDARD_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI keeps the first 49152 - 256 - 2 merges of the file (after its version line).
_NUM_STANDARD_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """The byte → printable character table of byte-level BPE (GPT-2, CLIP).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in increasing order, to
    `chr(256)`, `chr(257)`, …. The dict's order (printable bytes first) is the order of the first
    256 entries of CLIP's vocabulary.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    next_code = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code)
            next_code += 1
    return table


@functools.lru_cache(maxsize=2)
def _read_openai_bpe(path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocabulary and merges built from OpenAI's gzipped merges file, the way OpenAI builds them."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = tuple(_parse_merge(line, path) for line in lines[1 : _NUM_STANDARD_MERGES + 1])
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
    tokens += [first + second for first, second in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return {token: index for index, token in enumerate(tokens)}, merges


def _parse_merge(line: str, source: str) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise InputError(
            f"A BPE merge line must hold exactly two symbols separated by a space. "
            f"Received: line={line!r} in {source!r}."
        )
    return parts[0], parts[1]


class CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer.

    Args:
        vocab: token → id. `None` (with `merges=None`) loads the standard vocabulary shipped with
            the package.
        merges: the BPE merges, highest priority first, as `(left, right)` symbol pairs.

    Example:
        >>> tokenizer = CLIPTokenizer()
        >>> tokenizer.tokenize(["a photo of a cat."]).shape
        (1, 77)
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
    ):
        if (vocab is None) != (merges is None):
            raise ValueError(
                "Pass both `vocab` and `merges`, or neither for the standard CLIP vocabulary. "
                f"Received: vocab={'None' if vocab is None else 'dict'}, "
                f"merges={'None' if merges is None else 'sequence'}."
            )
        if vocab is None:
            vocab, merges = _read_openai_bpe(_standard_vocab_path())
        missing = [token for token in (START_OF_TEXT, END_OF_TEXT) if token not in vocab]
        if missing:
            raise ValueError(
                f"The vocabulary lacks the special token(s) {missing}; a CLIP vocabulary must "
                f"contain {START_OF_TEXT!r} and {END_OF_TEXT!r}. Received: a vocabulary of "
                f"{len(vocab)} tokens."
            )
        self._vocab = dict(vocab)
        self._merges = [tuple(merge) for merge in merges]
        self._id_to_token = {index: token for token, index in self._vocab.items()}
        self._symbol_to_byte = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
        self._bpe = None  # keras-hub's tokenizer, built on the first encoding

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike):
        """A tokenizer from Hugging Face-style `vocab.json` and `merges.txt` files."""
        with open(vocab_json, encoding="utf-8") as file:
            vocab = json.load(file)
        with open(merges_txt, encoding="utf-8") as file:
            lines = file.read().split("\n")
        merges = [
            _parse_merge(line, str(merges_txt))
            for line in lines
            if line.strip() and not line.startswith("#version")
        ]
        return cls(vocab, merges)

    @classmethod
    def from_directory(cls, path: str | os.PathLike):
        """A tokenizer from a directory holding its files.

        Looks, in this order, for `vocab.json` + `merges.txt` (Hugging Face, and the format
        `save_assets` writes), `vocabulary.json` + `merges.txt` (a keras-hub preset's
        `assets/tokenizer/`), `tokenizer.json` (Hugging Face fast tokenizer) and OpenAI's
        `bpe_simple_vocab_16e6.txt.gz`.
        """
        path = os.fspath(path)
        merges_txt = os.path.join(path, "merges.txt")
        tokenizer_json = os.path.join(path, "tokenizer.json")
        openai_bpe = os.path.join(path, STANDARD_VOCAB_FILE)
        for vocab_name in ("vocab.json", "vocabulary.json"):
            vocab_json = os.path.join(path, vocab_name)
            if os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
                return cls.from_files(vocab_json, merges_txt)
        if os.path.isfile(tokenizer_json):
            return cls._from_tokenizer_json(tokenizer_json)
        if os.path.isfile(openai_bpe):
            return cls(*_read_openai_bpe(openai_bpe))
        found = sorted(os.listdir(path)) if os.path.isdir(path) else "not a directory"
        raise InputError(
            "No CLIP tokenizer files found. Expected `vocab.json` (or `vocabulary.json`) + "
            "`merges.txt`, "
            f"`tokenizer.json` or `{STANDARD_VOCAB_FILE}`. Received: path={path!r} "
            f"(contents: {found})."
        )

    @classmethod
    def _from_tokenizer_json(cls, path: str):
        with open(path, encoding="utf-8") as file:
            model = json.load(file).get("model", {})
        if model.get("type") != "BPE":
            raise InputError(
                f"`tokenizer.json` must describe a BPE model. Received: model type "
                f"{model.get('type')!r} in {path!r}."
            )
        merges = [
            _parse_merge(merge, path) if isinstance(merge, str) else tuple(merge)
            for merge in model["merges"]
        ]
        return cls(model["vocab"], merges)

    def save_assets(self, directory: str | os.PathLike) -> list[str]:
        """Writes `vocab.json` and `merges.txt` (Hugging Face's format) and returns their paths."""
        os.makedirs(directory, exist_ok=True)
        vocab_json = os.path.join(directory, "vocab.json")
        merges_txt = os.path.join(directory, "merges.txt")
        ordered = dict(sorted(self._vocab.items(), key=lambda item: item[1]))
        with open(vocab_json, "w", encoding="utf-8") as file:
            json.dump(ordered, file, ensure_ascii=False)
        with open(merges_txt, "w", encoding="utf-8") as file:
            file.write("#version: 0.2\n")
            file.writelines(f"{first} {second}\n" for first, second in self._merges)
        return [vocab_json, merges_txt]

    # ---------------------------------------------------------------- properties

    @property
    def sot_token_id(self) -> int:
        """Id of `<|startoftext|>` (49406 in the standard vocabulary)."""
        return self._vocab[START_OF_TEXT]

    @property
    def eot_token_id(self) -> int:
        """Id of `<|endoftext|>` (49407 in the standard vocabulary)."""
        return self._vocab[END_OF_TEXT]

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included (49408 in the standard vocabulary)."""
        return len(self._vocab)

    def get_vocabulary(self) -> dict[str, int]:
        """A copy of the token → id table."""
        return dict(self._vocab)

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end-of-text tokens.

        The literal strings `<|startoftext|>` and `<|endoftext|>` in `text` become their special
        ids, as in `transformers`.
        """
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str. Received: text={text!r}.")
        return self._encode_batch([text])[0]

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text (no start/end-of-text), by keras-hub's BPE in one call."""
        if not texts:
            return []
        if self._bpe is None:
            from mtkd_jax.data.tf_setup import import_tensorflow

            import_tensorflow()  # keras-hub tokenizes with TensorFlow: keep it off accelerators
            import keras_hub

            self._bpe = keras_hub.tokenizers.CLIPTokenizer(
                vocabulary=self._vocab, merges=[f"{a} {b}" for a, b in self._merges]
            )
        ragged = self._bpe(list(texts))
        return [[int(i) for i in np.asarray(row).reshape(-1)] for row in ragged]

    def tokenize(
        self,
        texts: str | Sequence[str],
        context_length: int = 77,
        truncate: bool = True,
    ) -> np.ndarray:
        """Token ids laid out as OpenAI's `clip.tokenize` does.

        Each row is `[sot, ids…, eot, 0, 0, …]`: padded with 0 (OpenAI's layout; Hugging Face pads
        with the end-of-text id instead). Both layouts pool the same features, because CLIP's text
        encoder pools at the first end-of-text token (`argmax` of the ids, the end-of-text id
        being the largest). A text longer than `context_length` is cut and its last kept token
        replaced by end-of-text, so every row ends its text with end-of-text.

        Args:
            texts: one string or a sequence of strings.
            context_length: row length (77 for every released CLIP).
            truncate: cut texts that are too long; if False, raise instead.

        Returns:
            int32 array `[num_texts, context_length]`.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                "`context_length` must be an int ≥ 2 (room for start and end of text). "
                f"Received: context_length={context_length!r}."
            )
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"Every text must be a str. Received: text={text!r}.")
        rows = np.zeros((len(texts), context_length), dtype=np.int32)
        for index, (text, encoded) in enumerate(zip(texts, self._encode_batch(texts), strict=True)):
            ids = [self.sot_token_id, *encoded, self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"Text {index} has {len(ids)} tokens with start/end of text, more than "
                        f"context_length={context_length}. Pass truncate=True to cut it. "
                        f"Received: text={text[:80]!r}…"
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            rows[index, : len(ids)] = ids
        return rows

    __call__ = tokenize

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of token ids: bytes decoded as UTF-8 (invalid bytes → U+FFFD), each `</w>` a space,
        the ends stripped (as `transformers` does).

        To decode a row of `tokenize`, drop the padding first: `row[: list(row).index(eot) + 1]`.
        """
        specials = {self.sot_token_id, self.eot_token_id}
        tokens = []
        for token_id in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if token_id not in self._id_to_token:
                raise ValueError(
                    f"Token id out of the vocabulary (0 … {self.vocab_size - 1}). "
                    f"Received: id={token_id}."
                )
            if skip_special_tokens and token_id in specials:
                continue
            tokens.append(self._id_to_token[token_id])
        text = "".join(tokens)
        raw = bytes(self._symbol_to_byte.get(char, ord("?")) for char in text)
        # Special tokens are plain ASCII, so their characters map back to their own bytes.
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


def _standard_vocab_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", STANDARD_VOCAB_FILE)
