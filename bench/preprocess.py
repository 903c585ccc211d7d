#!/usr/bin/env python
"""Preprocessing throughput (tokens/s) with 1 and 2 tokenizer workers on a >= 50 MB real-text corpus.

The corpus is jsonl, one document per source file. Without ``--corpus`` one is assembled from
documentation text found on disk (``--source-dir``, default /usr/share/doc); ``--fetch-debian-docs``
first fetches the Debian documentation packages ``linux-doc-6.1`` (the kernel's Documentation/ tree,
GPL-2.0) and ``python3.11-doc`` (Python's documentation sources, PSF License) with ``apt-get download``
and unpacks them with ``dpkg-deb -x``. The tokenizer is ``--tokenizer`` or a byte-level BPE (32k vocab)
trained by tools/train_tokenizer.py on the first 8 MB of the corpus. Both runs must write identical files.

    python bench/preprocess.py --fetch-debian-docs          # prints a markdown section for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megatron.errors import DataError  # noqa: E402

DEBIAN_DOC_PACKAGES = ("linux-doc-6.1", "python3.11-doc")
TEXT_SUFFIXES = (".rst", ".txt", ".md", ".rst.txt", ".html")
TEXT_NAMES = re.compile(r"^(README|NEWS|FAQ|HISTORY|CHANGES|TODO|BUGS)([._-].*)?$", re.IGNORECASE)
HTML_TAG = re.compile(r"<script.*?</script>|<style.*?</style>|<[^>]+>", re.DOTALL | re.IGNORECASE)


def fetch_debian_docs(dest: Path) -> List[Path]:
    """Download and unpack the documentation packages; returns their unpacked roots."""
    debs, roots = dest / "debs", []
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in DEBIAN_DOC_PACKAGES:
        root = dest / pkg
        if not root.is_dir():
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if not found:
                subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, capture_output=True)
                found = sorted(debs.glob(f"{pkg}_*.deb"))
            tmp = dest / f"{pkg}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(tmp)], check=True)
            os.replace(tmp, root)
        roots.append(root)
    return roots


def doc_files(source_dirs: List[Path]) -> Iterator[Path]:
    for source in source_dirs:
        for path in sorted(source.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            name = path.name[:-3] if path.name.endswith(".gz") else path.name
            # Rendered HTML of Sphinx docs duplicates their _sources/*.rst.txt; keep only the sources.
            if "html" in path.parts and "_sources" not in path.parts:
                continue
            if name.endswith(TEXT_SUFFIXES) or TEXT_NAMES.match(name):
                yield path


def file_text(path: Path) -> Optional[str]:
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    if "\x00" in text:
        return None
    if ".html" in path.name:
        text = re.sub(r"\n\s*\n+", "\n\n", HTML_TAG.sub("", text))
    return text if len(text.strip()) >= 200 else None


def assemble_corpus(source_dirs: List[Path], out: Path, target_mb: float) -> dict:
    """One jsonl document per documentation file, until ``target_mb`` of text; written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    docs, size, per_source = 0, 0, {}
    with open(tmp, "w", encoding="utf-8") as fh:
        for path in doc_files(source_dirs):
            text = file_text(path)
            if text is None:
                continue
            fh.write(json.dumps({"text": text, "source": str(path)}) + "\n")
            docs += 1
            size += len(text.encode())
            top = next(str(s) for s in source_dirs if str(path).startswith(str(s)))
            per_source[top] = per_source.get(top, 0) + len(text.encode())
            if size >= target_mb * 2 ** 20:
                break
    os.replace(tmp, out)
    return {"docs": docs, "bytes": size, "per_source": per_source}


def corpus_stats(corpus: Path) -> dict:
    docs = size = 0
    with open(corpus, "rb") as fh:
        for line in fh:
            if line.strip():
                docs += 1
                size += len(json.loads(line)["text"].encode())
    return {"docs": docs, "bytes": size}


def cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the worker pool is joined per run)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def train_bench_tokenizer(corpus: Path, out_dir: Path, vocab_size: int) -> Path:
    tokenizer = out_dir / f"bench_bpe_{vocab_size}.json"
    if tokenizer.is_file():
        return tokenizer
    head = out_dir / "tokenizer_train_head.jsonl"
    with open(corpus, "rb") as src, open(head, "wb") as dst:
        copied = 0
        for line in src:
            dst.write(line)
            copied += len(line)
            if copied >= 8 * 2 ** 20:
                break
    subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(head), "--type",
                    "bpe", "--vocab-size", str(vocab_size), "--output", str(tokenizer)], check=True)
    return tokenizer


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, help="jsonl corpus (text key 'text'); assembled when omitted")
    p.add_argument("--source-dir", type=Path, action="append", default=[],
                   help="folders to assemble the corpus from (default /usr/share/doc)")
    p.add_argument("--fetch-debian-docs", action="store_true",
                   help=f"apt-get download + unpack {', '.join(DEBIAN_DOC_PACKAGES)} as sources")
    p.add_argument("--target-mb", type=float, default=64.0, help="assembled corpus size")
    p.add_argument("--min-mb", type=float, default=50.0, help="refuse to benchmark a smaller corpus")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: train a 32k BPE on the corpus)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "preprocess")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        corpus = args.corpus
        if corpus is None:
            sources = list(args.source_dir)
            if args.fetch_debian_docs:
                sources += fetch_debian_docs(args.out / "sources")
            sources = sources or [Path("/usr/share/doc")]
            corpus = args.out / "corpus.jsonl"
            info = assemble_corpus(sources, corpus, args.target_mb)
            print(f"assembled {corpus}: {info['docs']:,} documents, {info['bytes'] / 2 ** 20:.1f} MB of text from "
                  + ", ".join(f"{k} ({v / 2 ** 20:.1f} MB)" for k, v in info["per_source"].items()))
        else:
            info = corpus_stats(corpus)
        if info["bytes"] < args.min_mb * 2 ** 20:
            raise DataError(f"corpus '{corpus}' has {info['bytes'] / 2 ** 20:.1f} MB of text, expected at least "
                            f"{args.min_mb:g} MB; add --fetch-debian-docs or more --source-dir folders")
        tokenizer = args.tokenizer or train_bench_tokenizer(corpus, args.out, args.vocab_size)
        rows, digests = [], set()
        load_start = os.getloadavg()[0]
        for workers in args.workers:
            cpu_start = cpu_seconds()
            stats = preprocess(PreprocessOptions(input=[str(corpus)], output_prefix=str(args.out / f"w{workers}"),
                                                 vocab_file=str(tokenizer), workers=workers, quiet=True))
            cpu = cpu_seconds() - cpu_start
            digests.add((file_digest(stats.output + ".bin"), file_digest(stats.output + ".idx")))
            rows.append((workers, stats, cpu))
            print(f"workers={workers}: {stats.tokens:,} tokens in {stats.seconds:.1f} s = {stats.tokens_per_s:,.0f} "
                  f"tokens/s, {stats.docs_per_s:,.0f} docs/s, {info['bytes'] / 2 ** 20 / stats.seconds:.2f} MB/s, "
                  f"{cpu:.1f} CPU-s", flush=True)
        if len(digests) != 1:
            raise DataError("outputs differ between worker counts; preprocessing must be order-preserving")
    except (DataError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    base = rows[0][1].tokens_per_s
    print("\n| workers | wall s | tokens/s | docs/s | MB/s | speedup | CPU-s (all processes) | tokens per CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for workers, st, cpu in rows:
        print(f"| {workers} | {st.seconds:.1f} | {st.tokens_per_s:,.0f} | {st.docs_per_s:,.0f} | "
              f"{info['bytes'] / 2 ** 20 / st.seconds:.2f} | {st.tokens_per_s / base:.2f}x | {cpu:.1f} | "
              f"{st.tokens / max(cpu, 1e-9):,.0f} |")
    print(f"\ncorpus {corpus}: {info['docs']:,} docs, {info['bytes'] / 2 ** 20:.1f} MB; tokenizer {tokenizer}; "
          f"{rows[0][1].tokens:,} tokens ({rows[0][1].dtype}); outputs identical across worker counts; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
