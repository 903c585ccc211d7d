#!/usr/bin/env python
"""Train a tokenizer on text or jsonl files.

``--type bpe``: byte-level BPE in the GPT-NeoX style (NFC normalizer, ByteLevel pre-tokenizer and
decoder, ``<|endoftext|>`` = id 0 and ``<|padding|>`` = id 1), saved as a HuggingFace ``tokenizer.json``.
``--type spm``: a sentencepiece BPE model with byte fallback that keeps whitespace as is and has
``<|endoftext|>`` as a control piece, saved as ``OUTPUT`` (a ``.model`` path).

    python tools/train_tokenizer.py --input data/sample/corpus.jsonl --type bpe --vocab-size 4096 \\
        --output data/sample/tokenizer.json
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.data.corpus_reader import expand_inputs, is_jsonl, item_text, read_items  # noqa: E402
from megatron.errors import DataError, run_cli  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]


def iter_texts(paths: List[str], json_key: str) -> Iterator[str]:
    """Documents of every input, read like tools/preprocess_data.py reads them."""
    for path in expand_inputs(paths):
        for item in read_items(path, is_jsonl(path, "auto"), split_lines=False):
            text, error = item_text(item, json_key)
            if error is not None:
                raise DataError(f"{path}:{item[1]}: {error}")
            if text.strip():
                yield text


def train_bpe(paths: List[str], json_key: str, vocab_size: int, min_frequency: int, output: str) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(iter_texts(paths, json_key), trainer=trainer)
    save_atomic(output, tok.to_str(pretty=True).encode())


def train_spm(paths: List[str], json_key: str, vocab_size: int, output: str) -> None:
    import sentencepiece as spm
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        # sentencepiece reads "sentences"; feed lines so newlines survive as byte-fallback pieces.
        lines = (line for text in iter_texts(paths, json_key) for line in text.split("\n") if line)
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            control_symbols=["<|endoftext|>"], max_sentence_length=1 << 16, minloglevel=2)
        os.replace(prefix + ".model", out)


def save_atomic(path: str, payload: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(payload)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--input", nargs="+", required=True, help="txt / jsonl files (.gz/.zst ok), folders, globs")
    p.add_argument("--type", choices=("bpe", "spm"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--min-frequency", type=int, default=2, help="bpe: minimum pair count to merge")
    p.add_argument("--json-key", default="text")
    p.add_argument("--output", required=True, help="tokenizer.json (bpe) or NAME.model (spm)")
    args = p.parse_args(argv)
    try:
        if args.vocab_size < 300:
            raise DataError(f"--vocab-size {args.vocab_size} is too small; byte-level needs at least 300")
        if args.type == "bpe":
            train_bpe(args.input, args.json_key, args.vocab_size, args.min_frequency, args.output)
        else:
            train_spm(args.input, args.json_key, args.vocab_size, args.output)
    except RuntimeError as e:  # sentencepiece reports bad settings (e.g. vocab too large) this way
        raise DataError(f"tokenizer training failed: {str(e).splitlines()[0][:300]}") from None
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
