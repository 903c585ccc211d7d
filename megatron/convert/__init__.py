"""Conversion between our checkpoints and Hugging Face transformers model directories."""
from megatron.convert.common import ConversionError
from megatron.convert.hf_export import ExportResult, export_hf
from megatron.convert.hf_import import ImportResult, import_hf

__all__ = ["ConversionError", "ExportResult", "ImportResult", "export_hf", "import_hf"]
