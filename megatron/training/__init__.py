"""Training: engines (dense, pipeline, ZeRO) behind one protocol, resume, LR schedule, metrics, the loop."""
