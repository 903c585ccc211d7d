"""Conversion between our checkpoints and Hugging Face transformers model directories."""
from megatron.convert.hf_export import ExportResult, export_hf
from megatron.convert.hf_import import ImportResult, import_hf

__all__ = ["ExportResult", "ImportResult", "export_hf", "import_hf"]
