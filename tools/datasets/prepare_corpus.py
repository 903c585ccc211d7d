#!/usr/bin/env python
"""Build the real-text experiment corpus from documentation shipped in Debian packages.

Sources (real English prose, redistributable, fetched only through the Debian package registry):
  * ``linux-doc-6.1``   -- the Linux kernel's Documentation/ tree, reStructuredText (GPL-2.0), ~26 MB
  * ``python3.11-doc``  -- the Python 3.11 documentation sources (PSF License), ~11 MB
  * ``perl-doc``        -- Perl's manual pages in POD (GPL-1+ or Artistic), ~9 MB
  * ``git-doc``         -- Git's manual in AsciiDoc (GPL-2.0), ~3 MB
  * ``python-django-doc`` -- Django's documentation, page bodies of the HTML build as text (BSD-3), ~7 MB

Steps: ``apt-get download`` the packages (or reuse ``--deb-dir``), extract with ``dpkg-deb``, write one
JSON document per source file to ``OUT/corpus.jsonl`` (a held-out tail of files to
``OUT/heldout.jsonl`` for streaming evaluation), train a byte-level BPE tokenizer, and preprocess both
into indexed datasets. ``--max-mb`` caps the corpus for quick runs.

    python tools/datasets/prepare_corpus.py --out data/docs --vocab-size 8192
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import cli_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron.errors import UserError, run_cli  # noqa: E402

# package -> (directory inside the package, glob allowed; file suffixes taken)
PACKAGES = {
    "linux-doc-6.1": ("usr/share/doc/linux-doc-6.1/Documentation", (".rst.gz", ".txt.gz", ".rst")),
    "python3.11-doc": ("usr/share/doc/python3.11/html/_sources", (".rst.txt",)),
    "perl-doc": ("usr/share/perl/5.*/pod", (".pod",)),
    "git-doc": ("usr/share/doc/git-doc", (".txt",)),
    "python-django-doc": ("usr/share/doc/python-django-doc/html", (".html",)),
}
BLOCK_TAGS = {"p", "div", "li", "pre", "tr", "br", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "table"}


class CorpusError(UserError):
    pass


def run(cmd: List[str], cwd: Path = ROOT) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise CorpusError(f"command failed ({' '.join(cmd[:3])} ...): {' | '.join(tail)}")


def fetch_debs(deb_dir: Path) -> List[Path]:
    deb_dir.mkdir(parents=True, exist_ok=True)
    debs = []
    for pkg in PACKAGES:
        found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        if not found:
            if shutil.which("apt-get") is None:
                raise CorpusError(f"package {pkg} not in {deb_dir} and apt-get is not available; download "
                                  f"{pkg}_*.deb from a Debian mirror into {deb_dir}")
            run(["apt-get", "download", pkg], cwd=deb_dir)
            found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
            if not found:
                raise CorpusError(f"apt-get download {pkg} produced no .deb in {deb_dir}")
        debs.append(found[-1])
    return debs


class SphinxBodyText(HTMLParser):
    """Text of the page body of a Sphinx HTML page (Django's theme: ``<div class="yui-g">``), without
    navigation, sidebars or scripts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.body_depth = 0  # div nesting inside the body; 0 = outside
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if self.body_depth:
            if tag == "div":
                self.body_depth += 1
            if tag in ("script", "style"):
                self.skip += 1
            if tag in BLOCK_TAGS:
                self.parts.append("\n")
        elif tag == "div" and "yui-g" in (dict(attrs).get("class") or "").split():
            self.body_depth = 1

    def handle_endtag(self, tag):
        if not self.body_depth:
            return
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        if tag == "div":
            self.body_depth -= 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.body_depth and not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (line.rstrip() for line in "".join(self.parts).replace("\u00b6", "").splitlines())
        out, blank = [], False
        for line in lines:
            if line or not blank:
                out.append(line)
            blank = not line
        return "\n".join(out).strip()


def read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if path.suffix == ".html":
        parser = SphinxBodyText()
        parser.feed(text)
        text = parser.text()
    return text


def documents(extracted: Path) -> Iterator[Tuple[str, str]]:
    """(source name, text) for each documentation file, in a stable order."""
    for pkg, (subdir, suffixes) in PACKAGES.items():
        bases = sorted(p for p in extracted.glob(subdir) if p.is_dir())
        if not bases:
            raise CorpusError(f"{pkg}: expected directory {subdir} inside the package")
        base = bases[-1]
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.name.endswith(suffixes):
                text = read_text(path).strip()
                if len(text) > 200:
                    yield f"{pkg}/{path.relative_to(base)}", text


def write_jsonl(out: Path, deb_dir: Path, heldout_every: int, max_bytes: int) -> Tuple[int, int, int]:
    """Extract packages and write corpus.jsonl and heldout.jsonl atomically. Returns counts."""
    debs = fetch_debs(deb_dir)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        extracted = Path(tmp) / "root"
        for deb in debs:
            run(["dpkg-deb", "-x", str(deb), str(extracted)])
        train_tmp, held_tmp = out / ".corpus.jsonl.tmp", out / ".heldout.jsonl.tmp"
        n_train = n_held = total = 0
        with open(train_tmp, "w") as ft, open(held_tmp, "w") as fh:
            for i, (name, text) in enumerate(documents(extracted)):
                line = json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n"
                if heldout_every and i % heldout_every == heldout_every - 1:
                    fh.write(line)
                    n_held += 1
                else:
                    ft.write(line)
                    n_train += 1
                total += len(text.encode())
                if max_bytes and total >= max_bytes:
                    break
        os.replace(train_tmp, out / "corpus.jsonl")
        os.replace(held_tmp, out / "heldout.jsonl")
    return n_train, n_held, total


def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--out", default="data/docs", help="output directory")
    p.add_argument("--deb-dir", default=None, help="where the .deb files are (or go); default OUT/debs")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-mb", type=float, default=0, help="stop after this many MB of text (0 = all)")
    p.add_argument("--heldout-every", type=int, default=50, help="every N-th document goes to heldout.jsonl")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    deb_dir = Path(args.deb_dir) if args.deb_dir else out / "debs"
    n_train, n_held, total = write_jsonl(out, deb_dir, args.heldout_every, int(args.max_mb * 2 ** 20))
    print(f"corpus: {n_train} train documents, {n_held} held out, {total / 2 ** 20:.1f} MB of text")
    tok = out / "tokenizer.json"
    run([py, "tools/train_tokenizer.py", "--input", str(out / "corpus.jsonl"), "--type", "bpe",
         "--vocab-size", str(args.vocab_size), "--output", str(tok)])
    for name in ("corpus", "heldout"):
        run([py, "tools/preprocess_data.py", "--input", str(out / f"{name}.jsonl"), "--output-prefix",
             str(out / name), "--tokenizer-type", "HFTokenizer", "--vocab-file", str(tok),
             "--workers", str(args.workers)])
    print(f"tokenizer {tok}; datasets {out / 'corpus_text_document'}, {out / 'heldout_text_document'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
