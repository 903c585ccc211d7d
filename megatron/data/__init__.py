"""Data pipeline: Megatron-format indexed datasets, GPT samples, splits and blending."""
from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.build_datasets import build_dataset, build_train_valid_test_datasets
from megatron.data.gpt_dataset import GPTDataset, parse_split, split_boundaries
from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset, best_fitting_dtype

__all__ = ["MMapIndexedDataset", "IndexedDatasetBuilder", "best_fitting_dtype", "GPTDataset",
           "BlendableDataset", "build_train_valid_test_datasets", "build_dataset", "parse_split",
           "split_boundaries"]
