from megatron.checkpointing.checkpoint import (CheckpointError, ensure_writable, load_checkpoint,
                                               read_manifest, resolve_checkpoint_dir, save_checkpoint)

__all__ = ["CheckpointError", "ensure_writable", "load_checkpoint", "read_manifest",
           "resolve_checkpoint_dir", "save_checkpoint"]
