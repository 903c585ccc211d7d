#!/usr/bin/env python
"""Rebuild corpus.jsonl from the Python documentation topics shipped with CPython (``pydoc_data.topics``).

Each topic (the text ``help("assert")`` shows) is cut at paragraph boundaries into documents of at most
~4 KB, in sorted topic order, so the output depends only on the Python version (3.11.7 here).

    python data/sample/make_corpus.py > data/sample/corpus.jsonl
"""
from __future__ import annotations

import json
import sys
from typing import Iterator, List

import pydoc_data.topics

MAX_DOC_CHARS = 4000


def documents(text: str, limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    chunk: List[str] = []
    size = 0
    for para in text.strip().split("\n\n"):
        if chunk and size + len(para) > limit:
            yield "\n\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(para)
        size += len(para) + 2
    if chunk:
        yield "\n\n".join(chunk) + "\n"


def main() -> None:
    for topic in sorted(pydoc_data.topics.topics):
        for part, doc in enumerate(documents(pydoc_data.topics.topics[topic])):
            sys.stdout.write(json.dumps({"text": doc, "meta": {"topic": topic, "part": part}}) + "\n")


if __name__ == "__main__":
    main()
