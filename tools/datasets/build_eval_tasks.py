#!/usr/bin/env python
"""Write the data of the local evaluation tasks (megatron/evaluation/tasks/) from held-out text.

    python tools/datasets/build_eval_tasks.py --input data/docs/heldout.jsonl --out data/eval
    python tools/datasets/build_eval_tasks.py --input data/sample/corpus.jsonl --out /tmp/eval --max-examples 40

The input is JSONL with a "text" field per document (what tools/datasets/prepare_corpus.py writes to
``heldout.jsonl``, or the bundled ``data/sample/corpus.jsonl``). Prose paragraphs are picked out of the
documentation (code blocks, tables and markup lines are skipped) and turned into:

* ``docs_lambada.jsonl`` -- LAMBADA-style last word: a passage that ends with a word that already
  occurred earlier in it, so the context predicts it; {"text": passage} as EleutherAI/lambada_openai.
* ``docs_cloze.jsonl`` -- multiple-choice cloze: the first sentences of a paragraph and four candidate
  final sentences (the true one and three from other documents); {"context", "choices", "label"}.
* ``docs_ppl.jsonl`` -- whole documents (capped at --ppl-chars) for rolling perplexity; {"text"}.

Output is deterministic for a given input and --seed; files are written atomically.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.errors import UserError, run_cli  # noqa: E402

WORD = re.compile(r"^[A-Za-z][a-z]+$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
MARKUP_START = ("..", "::", "*", "-", "=", "#", "|", ">>>", "$", "+", "`", "[", "%", "<", "{")
STOPWORDS = set("""the a an and or but if then than that this these those with from into onto over under for of
to in on at by as is are was were be been being it its it's not no yes can could should would will may might
must do does did done have has had which what when where who whom whose why how all any each every some such
there here also only just more most other same very your you our we they their them his her he she one two""".split())


class BuildError(UserError):
    pass


def read_documents(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise BuildError(f"input file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BuildError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
            if isinstance(text, str) and text.strip():
                yield text


def prose_paragraphs(text: str, min_words: int = 20) -> List[str]:
    """Paragraphs of running prose, each joined into one line with single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(ln.startswith(("    ", "\t")) or ln.lstrip().startswith(MARKUP_START) for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines)
        words = para.split()
        if len(words) < min_words or not para.endswith((".", "!", "?")):
            continue
        plain = sum(1 for w in words if WORD.match(w.strip("\"'(),.;:!?")))
        if plain / len(words) >= 0.8:
            out.append(" ".join(words))
    return out


def lambada_passage(para: str, max_words: int = 80, min_context: int = 15) -> Optional[str]:
    """The paragraph cut after its last content word that also occurs earlier (the target), or None."""
    words = para.split(" ")
    for k in range(len(words) - 1, min_context - 1, -1):
        core = words[k].rstrip(".,;:!?\"')")
        if not WORD.match(core) or len(core) < 4 or core.lower() in STOPWORDS:
            continue
        start = max(0, k - max_words)
        earlier = {w.strip("\"'(),.;:!?").lower() for w in words[start:k]}
        if core.lower() in earlier and k - start >= min_context:
            return " ".join(words[start:k] + [core])
    return None


def sentences(para: str) -> List[str]:
    return [s for s in SENTENCE_END.split(para) if s]


def cloze_items(paras: List[Dict[str, object]], rng: random.Random, max_context: int = 60,
                max_ending: int = 30) -> List[Dict[str, object]]:
    """Context = leading sentences, choices = the true last sentence + 3 endings of other documents."""
    pool = []
    for p in paras:
        sents = sentences(str(p["text"]))
        if len(sents) < 2 or not 4 <= len(sents[-1].split()) <= max_ending:
            continue
        context = " ".join(" ".join(sents[:-1]).split(" ")[-max_context:])
        pool.append({"doc": p["doc"], "context": context, "ending": sents[-1]})
    items = []
    for item in pool:
        others = [o["ending"] for o in pool if o["doc"] != item["doc"] and o["ending"] != item["ending"]]
        if len(set(others)) < 3:
            continue
        choices = rng.sample(sorted(set(others)), 3)
        label = rng.randrange(4)
        choices.insert(label, item["ending"])
        items.append({"context": item["context"], "choices": choices, "label": label})
    return items


def build(input_path: Path, max_examples: int, seed: int, ppl_chars: int) -> Dict[str, List[Dict[str, object]]]:
    rng = random.Random(seed)
    paras: List[Dict[str, object]] = []
    docs: List[str] = []
    for i, text in enumerate(read_documents(input_path)):
        docs.append(text)
        paras.extend({"doc": i, "text": p} for p in prose_paragraphs(text))
    if not paras:
        raise BuildError(f"{input_path}: no prose paragraphs found (need paragraphs of 20+ plain words)")
    lambada = [{"text": t} for t in (lambada_passage(str(p["text"])) for p in paras) if t]
    cloze = cloze_items(paras, rng)
    ppl = [{"text": d[:ppl_chars].rsplit(" ", 1)[0] if len(d) > ppl_chars else d} for d in docs]
    out = {}
    for name, rows in (("docs_lambada", lambada), ("docs_cloze", cloze), ("docs_ppl", ppl)):
        if not rows:
            raise BuildError(f"{input_path}: no examples for {name}")
        rows = list(rows)
        if len(rows) > max_examples:  # an even spread over the input, in input order
            rows = [rows[int(i * len(rows) / max_examples)] for i in range(max_examples)]
        out[name] = rows
    return out


def write_jsonl(path: Path, rows: List[Dict[str, object]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--input", default="data/docs/heldout.jsonl", help="JSONL documents with a \"text\" field")
    p.add_argument("--out", default="data/eval", help="directory for docs_*.jsonl")
    p.add_argument("--max-examples", type=int, default=500, help="examples per task at most")
    p.add_argument("--ppl-chars", type=int, default=6000, help="characters per perplexity document at most")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        if args.max_examples < 1 or args.ppl_chars < 100:
            raise BuildError("--max-examples must be >= 1 and --ppl-chars >= 100")
        tasks = build(Path(args.input), args.max_examples, args.seed, args.ppl_chars)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in tasks.items():
            write_jsonl(out / f"{name}.jsonl", rows)
    except OSError as e:
        raise BuildError(str(e)) from None
    print(", ".join(f"{name}: {len(rows)}" for name, rows in tasks.items()) + f" examples in {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
