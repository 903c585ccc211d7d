"""Launch commands: torchrun on one node, per-node torchrun over ssh, or the DeepSpeed launcher."""
