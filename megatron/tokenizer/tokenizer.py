"""Tokenizers behind one small interface: HF ``tokenizer.json``, sentencepiece ``.model`` and GPT-2 BPE files.

Every tokenizer exposes ``vocab_size``, ``eod_id``, ``encode``, ``decode`` and ``separator_ids``. Separator
ids are derived from the tokenizer's own vocabulary (the text each token stands for), never hard-coded.
"""
from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from megatron.errors import DataError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BYTE_FALLBACK_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPM_SPACE = "\u2581"  # '▁', sentencepiece's (and Metaspace's) visible space


@lru_cache(maxsize=1)
def byte_level_char_to_byte() -> Dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest
    (control bytes, space, ...) are shifted to code points 256+ in byte order (so ' ' is 'Ġ', '\\n' is 'Ċ')."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    mapping = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping


def byte_level_token_text(token: str) -> Optional[str]:
    """The text a byte-level BPE token stands for, or None when it is not whole UTF-8."""
    table = byte_level_char_to_byte()
    try:
        return bytes(table[c] for c in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def piece_text(piece: str) -> str:
    """The text of a sentencepiece/Metaspace piece: '▁' is a space, '<0x0A>' byte pieces are that byte."""
    m = BYTE_FALLBACK_PIECE.match(piece)
    if m:
        value = int(m.group(1), 16)
        return chr(value) if value < 0x80 else ""
    return piece.replace(SPM_SPACE, " ")


def wanted_separator_texts(strings: Iterable[str], include_space_prefixed: bool) -> set:
    wanted = set(strings)
    if include_space_prefixed:
        wanted |= {" " + s for s in strings}
    return wanted


class Tokenizer(ABC):
    """Common interface; ``token_texts`` maps id -> the exact text the token stands for."""

    name: str = "tokenizer"

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> List[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def token_texts(self) -> Dict[int, str]: ...

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def token_id(self, token: str) -> Optional[int]:
        """The id of the vocabulary entry ``token`` (a special token's name, e.g. '<|im_end|>'), or None."""
        return None

    def separator_ids(self, strings: Sequence[str], include_space_prefixed: bool = True) -> List[int]:
        """Ids of the tokens whose text is exactly one of ``strings`` (or ' ' + one of them)."""
        wanted = wanted_separator_texts(strings, include_space_prefixed)
        return sorted(i for i, text in self.token_texts().items() if text in wanted)


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizers`` model (``tokenizer.json``); also used for GPT-2 vocab/merges files."""

    name = "HFTokenizer"

    def __init__(self, hf_tokenizer, source: str):
        self._tok = hf_tokenizer
        self.source = source
        self._eod = self._find_eod()

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        from tokenizers import Tokenizer as HFTok
        try:
            return cls(HFTok.from_file(path), path)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise DataError(f"tokenizer file '{path}' could not be read as a HuggingFace tokenizer.json: "
                            f"{str(e).splitlines()[0][:200]}") from None

    def _find_eod(self) -> int:
        for candidate in EOD_CANDIDATES:
            idx = self._tok.token_to_id(candidate)
            if idx is not None:
                return idx
        raise DataError(f"tokenizer '{self.source}' has no end-of-document token; expected one of "
                        f"{', '.join(EOD_CANDIDATES)}")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        return self._eod

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def _is_byte_level(self) -> bool:
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        stack = [decoder]
        while stack:
            node = stack.pop()
            if node.get("type") == "ByteLevel":
                return True
            stack.extend(node.get("decoders") or [])
        return False

    def token_texts(self) -> Dict[int, str]:
        added = list(self._tok.get_added_tokens_decoder().values())
        specials = {t.content for t in added if t.special}
        # Added tokens (GPT-NeoX's runs of spaces, for example) hold literal text, not byte-level symbols.
        literal = {t.content for t in added if not t.special}
        byte_level = self._is_byte_level()
        texts = {}
        for token, idx in self._tok.get_vocab(with_added_tokens=True).items():
            if token in specials:
                continue
            if token in literal:
                text = token
            else:
                text = byte_level_token_text(token) if byte_level else piece_text(token)
            if text:
                texts[idx] = text
        return texts


class SPMTokenizer(Tokenizer):
    """A sentencepiece ``.model``; EOD is ``<|endoftext|>`` when the model has that piece, else ``</s>``."""

    name = "SPMTokenizer"

    def __init__(self, path: str):
        import sentencepiece as spm
        self.source = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"sentencepiece model '{path}' could not be loaded: {str(e)[:200]}") from None
        endoftext = self._sp.piece_to_id("<|endoftext|>")
        if endoftext != self._sp.unk_id():
            self._eod = endoftext
        elif self._sp.eos_id() >= 0:
            self._eod = self._sp.eos_id()
        else:
            raise DataError(f"sentencepiece model '{path}' has neither '<|endoftext|>' nor an eos piece")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        return self._eod

    def encode(self, text: str) -> List[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, token: str) -> Optional[int]:
        idx = self._sp.piece_to_id(token)
        return None if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx) else idx

    def token_texts(self) -> Dict[int, str]:
        # Decoding a single id drops a leading '▁', so the piece text is read directly instead.
        texts = {}
        for idx in range(self._sp.get_piece_size()):
            if self._sp.is_control(idx) or self._sp.is_unknown(idx):
                continue
            text = piece_text(self._sp.id_to_piece(idx))
            if text:
                texts[idx] = text
        return texts


def gpt2_bpe_tokenizer(vocab_file: str, merge_file: str) -> HFTokenizer:
    """GPT-2 style ``vocab.json`` + ``merges.txt``, loaded through HF tokenizers with byte-level pieces."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers
    try:
        bpe = models.BPE.from_file(vocab_file, merge_file)
    except Exception as e:
        raise DataError(f"GPT-2 BPE files '{vocab_file}' / '{merge_file}' could not be read (expected a "
                        f"vocab.json and a merges.txt): {str(e).splitlines()[0][:200]}") from None
    tok = HFTok(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens(["<|endoftext|>"])
    return HFTokenizer(tok, vocab_file)


class CharLevelTokenizer(Tokenizer):
    """GPT-NeoX's ``CharLevelTokenizer``: the ids are the text's UTF-8 bytes (no offset), the vocabulary
    512, end-of-document 0 and padding 1, as NeoX writes them; needs no vocabulary file. Decoding joins
    the bytes (ids 256 and up, and the two special ids, stand for no text)."""

    name = "CharLevelTokenizer"
    VOCAB_SIZE, EOD, PAD = 512, 0, 1

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    @property
    def eod_id(self) -> int:
        return self.EOD

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if self.PAD < int(i) < 256).decode("utf-8", errors="replace")

    def token_texts(self) -> Dict[int, str]:
        return {i: chr(i) for i in range(self.PAD + 1, 128)}  # single bytes that are whole characters


PADDING_TOKEN = "<|padding|>"  # what NeoX's HFGPT2Tokenizer adds as its pad token


def hf_gpt2_tokenizer(vocab_file: Optional[str]) -> HFTokenizer:
    """GPT-NeoX's ``HFGPT2Tokenizer`` from local files: a GPT-2 ``tokenizer.json``, or a folder holding
    one (or ``vocab.json`` + ``merges.txt``), with NeoX's ``<|padding|>`` pad token added."""
    if not vocab_file:
        raise DataError("tokenizer_type HFGPT2Tokenizer needs a vocab_file here (a GPT-2 tokenizer.json or a "
                        "folder with vocab.json + merges.txt); NeoX's download of the hub's 'gpt2' is not done")
    path = Path(vocab_file)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = gpt2_bpe_tokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
        else:
            raise DataError(f"folder '{vocab_file}' has neither tokenizer.json nor vocab.json + merges.txt "
                            "(tokenizer_type HFGPT2Tokenizer)")
    else:
        tok = HFTokenizer.from_file(_require_file(vocab_file, "a vocab_file (tokenizer.json)", "HFGPT2Tokenizer"))
    if tok._tok.token_to_id(PADDING_TOKEN) is None:
        tok._tok.add_special_tokens([PADDING_TOKEN])
    tok.name = "HFGPT2Tokenizer"
    return tok


def _require_file(path: Optional[str], what: str, tokenizer_type: str) -> str:
    if not path:
        raise DataError(f"tokenizer_type {tokenizer_type} needs {what}")
    if not os.path.isfile(path):
        raise DataError(f"{what} '{path}' not found (tokenizer_type {tokenizer_type})")
    return path


TOKENIZER_TYPES = ("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer", "HFGPT2Tokenizer", "CharLevelTokenizer")


def build_tokenizer(tokenizer_type: str, vocab_file: Optional[str],
                    merge_file: Optional[str] = None) -> Tokenizer:
    """``HFTokenizer`` (tokenizer.json), ``SPMTokenizer`` (.model), ``GPT2BPETokenizer`` (vocab + merges),
    and NeoX's ``HFGPT2Tokenizer`` and ``CharLevelTokenizer``."""
    if tokenizer_type == "HFTokenizer":
        return HFTokenizer.from_file(_require_file(vocab_file, "a vocab_file (tokenizer.json)", tokenizer_type))
    if tokenizer_type == "SPMTokenizer":
        return SPMTokenizer(_require_file(vocab_file, "a vocab_file (sentencepiece .model)", tokenizer_type))
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = _require_file(vocab_file, "a vocab_file (vocab.json)", tokenizer_type)
        merges = _require_file(merge_file, "a merge_file (merges.txt)", tokenizer_type)
        return gpt2_bpe_tokenizer(vocab, merges)
    if tokenizer_type == "HFGPT2Tokenizer":
        return hf_gpt2_tokenizer(vocab_file)
    if tokenizer_type == "CharLevelTokenizer":
        return CharLevelTokenizer()
    raise DataError(f"unknown tokenizer_type '{tokenizer_type}'; expected one of {', '.join(TOKENIZER_TYPES)}")


def padded_vocab_size(vocab_size: int, divisible_by: int, model_parallel_size: int = 1) -> int:
    """Megatron padding: round up to a multiple of ``divisible_by * model_parallel_size``."""
    multiple = max(1, divisible_by) * max(1, model_parallel_size)
    return -(-vocab_size // multiple) * multiple


def tokenizer_from_path(path: str) -> Tokenizer:
    """Convenience for tools: pick the loader from the file name (.model -> SPM, else tokenizer.json)."""
    kind = "SPMTokenizer" if Path(path).suffix == ".model" else "HFTokenizer"
    return build_tokenizer(kind, path)
