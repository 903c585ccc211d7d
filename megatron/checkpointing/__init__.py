"""Checkpoints: atomic sharded save/load, exact resume, resharding across layouts."""
from megatron.checkpointing.checkpoint import (
                                               ensure_writable,
                                               load_checkpoint,
                                               load_optimizer_state,
                                               read_manifest,
                                               resolve_checkpoint_dir,
                                               restore_rng_state,
                                               save_checkpoint,
)

__all__ = ["ensure_writable", "load_checkpoint", "load_optimizer_state", "read_manifest", "resolve_checkpoint_dir",
           "restore_rng_state", "save_checkpoint"]
