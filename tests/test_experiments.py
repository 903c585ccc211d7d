"""Issue 9: the experiment runner (smoke settings) and the corpus builder's pure parts."""
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "datasets"))

import prepare_corpus  # noqa: E402


@pytest.mark.slow  # four short training runs plus streaming evaluation: minutes on a loaded 2-core box
def test_smoke_run_writes_table_from_its_logs(tmp_path):
    out = tmp_path / "exp"
    res = subprocess.run([sys.executable, "tools/run_experiments.py", "--smoke", "--out-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["full", "sepllm", "streamingllm", "fixed_interval"]
    table = (out / "RESULTS.md").read_text()
    for variant, r in results.items():
        # The table's validation ppl is exp of the last validation loss the run logged.
        valid = [json.loads(line)["valid/loss"] for line in (out / variant / "metrics.jsonl").read_text().splitlines()
                 if "valid/loss" in line]
        assert r["valid_ppl"] == pytest.approx(math.exp(valid[-1]))
        assert f"| {variant} | {r['valid_ppl']:.2f} |" in table
        # Local-task accuracies through eval.py's harness, 16 examples each in smoke mode.
        assert r["task_examples"] == {"docs_lambada": 16, "docs_cloze": 16}
        assert 0 <= r["cloze_acc"] <= 1 and r["lambada_ppl"] > 1
        assert f"| {100 * r['cloze_acc']:.1f}% / {100 * r['cloze_acc_norm']:.1f}% |" in table
    full, sep, stream = results["full"], results["sepllm"], results["streamingllm"]
    assert full["kv_kept_frac"] == pytest.approx(1.0)
    assert sep["kv_kept"] < full["kv_kept"] and stream["kv_kept"] < sep["kv_kept"]
    assert sep["attn_flops"] < full["attn_flops"]
    # Bounded caches stay within the budget c=64; full attention keeps the whole 8 x 128 stream.
    assert max(sep["stream_kv_max"], stream["stream_kv_max"], results["fixed_interval"]["stream_kv_max"]) <= 64
    assert full["stream_kv_max"] == 8 * 128
    for png in ("experiments_loss.png", "experiments_streaming.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in table


def test_unknown_variant_is_rejected(tmp_path):
    res = subprocess.run([sys.executable, "tools/run_experiments.py", "--smoke", "--variants", "full,sparse",
                          "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "unknown variant(s) ['sparse']" in res.stderr


def test_write_section_replaces_only_its_block(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import run_experiments

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nkept above\n")
    run_experiments.write_section(md, "first")
    md.write_text(md.read_text() + "\nkept below\n")
    run_experiments.write_section(md, "second")
    text = md.read_text()
    assert "kept above" in text and "kept below" in text
    assert "second" in text and "first" not in text
    assert text.count(run_experiments.BEGIN) == 1


def test_documents_walks_each_package_and_extracts_html_bodies(tmp_path):
    root = tmp_path / "root"
    long = "Separators squeeze a segment into one token. " * 10
    html_page = ("<html><head><script>var x = 1;</script></head><body><div id='nav'>Home | Index</div>"
                 f"<div class='yui-g' id='t'><h1>Models&para;</h1><div class='section'><p>{long}</p>"
                 "<script>skip()</script></div></div><div id='ft'>footer</div></body></html>")
    files = {
        "usr/share/doc/linux-doc-6.1/Documentation/admin/a.rst.gz": gzip.compress(long.encode()),
        "usr/share/doc/linux-doc-6.1/Documentation/admin/short.rst.gz": gzip.compress(b"too short"),
        "usr/share/doc/linux-doc-6.1/Documentation/admin/image.svg": long.encode(),
        "usr/share/doc/python3.11/html/_sources/library/os.rst.txt": long.encode(),
        "usr/share/perl/5.36.0/pod/perlfunc.pod": long.encode(),
        "usr/share/doc/git-doc/git-log.txt": long.encode(),
        "usr/share/doc/python-django-doc/html/topics/models.html": html_page.encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    docs = dict(prepare_corpus.documents(root))
    assert sorted(docs) == ["git-doc/git-log.txt", "linux-doc-6.1/admin/a.rst.gz", "perl-doc/perlfunc.pod",
                            "python-django-doc/topics/models.html", "python3.11-doc/library/os.rst.txt"]
    html = docs["python-django-doc/topics/models.html"]
    assert html.startswith("Models") and long.strip() in html
    for noise in ("Home", "footer", "skip()", "var x"):
        assert noise not in html


def test_missing_package_directory_is_named(tmp_path):
    with pytest.raises(prepare_corpus.CorpusError, match="linux-doc-6.1: expected directory"):
        list(prepare_corpus.documents(tmp_path))
