"""NeoX's checkpoint keys that act during training: ``checkpoint_scale`` (when to save) and
``checkpoint_validation_with_forward_pass`` (a forward pass saved with each checkpoint and repeated
after loading it).

NeoX stores the logits of a forward pass over the tokens ``0 .. seq_length`` with the checkpoint; here the
record is the loss of the same fixed batch (every layout computes it, reduced like the validation
loss), kept in the manifest's trainer state. After loading, the same loss must come out: exactly on the
same layout, within float rounding on another one; otherwise the load is refused.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from megatron.errors import CheckpointError

FORWARD_RECORD = "forward_pass_loss"


def on_save_schedule(ck, iteration: int) -> bool:
    """NeoX's rule: linear saves every ``checkpoint_factor`` iterations, log at 1 and every power of it."""
    if not ck.checkpoint_factor:
        return False
    if ck.checkpoint_scale == "linear":
        return iteration % ck.checkpoint_factor == 0
    power = 1
    while power <= iteration:
        if power == iteration:
            return True
        power *= ck.checkpoint_factor
    return False


def fixed_batch_loss(trainer) -> float:
    """The loss of tokens 0 .. seq_length (modulo the vocabulary) in every row. Collective."""
    seq, vocab = trainer.cfg.model.seq_length, trainer.tokenizer.vocab_size
    batch = (torch.arange(seq + 1) % vocab).repeat(trainer.micro, 1)
    was_training = trainer.model.training
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.engine.eval_loss([batch] * trainer.accum))
    trainer.model.train(was_training)
    return loss


def forward_record(trainer) -> Dict[str, float]:
    """What a save adds to the trainer state when the key is set."""
    if not trainer.cfg.checkpoint.checkpoint_validation_with_forward_pass:
        return {}
    return {FORWARD_RECORD: fixed_batch_loss(trainer)}


def validate_loaded(trainer, manifest: Dict[str, Any], log: Callable[[str], None]) -> None:
    """After loading: the fixed batch's loss against the saved one (every rank calls this)."""
    if not trainer.cfg.checkpoint.checkpoint_validation_with_forward_pass:
        return
    where = trainer.cfg.checkpoint.load
    saved = manifest.get("trainer", {}).get(FORWARD_RECORD)
    if saved is None:
        log(f"warning: checkpoint_validation_with_forward_pass: the checkpoint in {where} was saved without "
            "a forward-pass record; not validated")
        return
    now = fixed_batch_loss(trainer)
    if now == saved:
        log(f"checkpoint validated with a forward pass: the fixed batch's loss {now:.6f} equals the saved one")
    elif abs(now - saved) <= 1e-5 * abs(saved) + 1e-6:
        log(f"checkpoint validated with a forward pass: the fixed batch's loss {now:.8f} is within rounding "
            f"of the saved {saved:.8f} (another layout)")
    else:
        raise CheckpointError(f"checkpoint in {where} fails checkpoint_validation_with_forward_pass: the fixed "
                              f"batch's loss is {now:.6f} after loading, {saved:.6f} when saved")
