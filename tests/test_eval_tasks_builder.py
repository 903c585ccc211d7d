"""tools/datasets/build_eval_tasks.py: which text becomes which task example, and its errors."""
from __future__ import annotations

import json
import random
import sys

from conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "tools" / "datasets"))

import build_eval_tasks as builder  # noqa: E402

PROSE = ("The scheduler keeps a queue of tasks for every processor. When a processor becomes idle, the "
         "scheduler takes the next runnable task from its queue and, if the queue is empty, steals work from "
         "a busy neighbour so that no processor stays idle while another one still has queued tasks.")


def test_prose_paragraphs_skip_code_and_markup():
    text = "\n\n".join([PROSE, "    for task in queue:\n        run(task)", ".. note:: a directive\n" + PROSE,
                        "Too short to count.", "x = 1; y = 2; z = 3; " * 8 + "end."])
    assert builder.prose_paragraphs(text) == [PROSE]


def test_lambada_target_occurred_earlier():
    passage = builder.lambada_passage(PROSE)
    words = passage.split(" ")
    assert passage.endswith(" tasks") and PROSE.startswith(" ".join(words[:-1]))
    assert words[-1].lower() in {w.strip(".,").lower() for w in words[:-1]}
    assert builder.lambada_passage("the cat and a dog " * 5 + "elephant.") is None  # no earlier content word


def test_cloze_label_points_at_the_true_ending():
    paras = [{"doc": i, "text": f"Sentence one of paragraph {i} is here. The ending of paragraph {i} is unique."}
             for i in range(6)]
    items = builder.cloze_items(paras, random.Random(0))
    assert len(items) == 6
    for i, item in enumerate(items):
        assert item["choices"][item["label"]] == f"The ending of paragraph {i} is unique."
        assert len(set(item["choices"])) == 4 and item["context"] == f"Sentence one of paragraph {i} is here."


def test_cli_writes_three_files_and_reports_bad_input(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"{PROSE} Queue number {i} holds {i + 2} tasks.\n\n{PROSE}"}) + "\n"
                           for i in range(8)))
    out = tmp_path / "eval"
    proc = run_cli(["tools/datasets/build_eval_tasks.py", "--input", str(src), "--out", str(out),
                    "--max-examples", "5"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    counts = {p.stem: len(p.read_text().splitlines()) for p in out.glob("*.jsonl")}
    assert counts == {"docs_lambada": 5, "docs_cloze": 5, "docs_ppl": 5}
    src.write_text('{"txt": "no text field"}\n')
    proc = run_cli(["tools/datasets/build_eval_tasks.py", "--input", str(src), "--out", str(out)], timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (f"error: {src}:1: expected a JSON object with a "
                                                            '"text" field')
