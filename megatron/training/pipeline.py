"""Pipeline parallelism on ``torch.distributed.pipelining`` (1F1B, GPipe, interleaved 1F1B).

Each rank's :class:`~megatron.model.gpt.GPTModel` holds its layers (one chunk, or ``v`` chunks for
interleaving) and owns the parameters; every chunk is a thin :class:`PipelineChunk` view that runs
a slice of them and is wrapped in a ``PipelineStage``. Stage-to-stage messages are
``(hidden, tokens)``: later stages need the tokens for the Sep-Attention separator flags (and
document ids), and sending them (``B x L`` int64, no gradient) is cheaper and simpler than sending
every derived mask. The last stage returns its vocabulary shard of the logits and the schedule's
loss function applies the vocab-parallel cross entropy.

Gradient accumulation is the pipeline's micro-batches: the loss function returns
``loss / n_microbatches`` (``scale_grads=False``), the same arithmetic as the non-pipelined path.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from megatron.model import lm_loss, split_batch


class PipelineChunk(nn.Module):
    """Forward of one pipeline stage: a contiguous slice of the rank model's layers, plus the
    embedding on the first stage and the final norm + LM head on the last."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[int], is_first: bool, is_last: bool,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        super().__init__()
        self.layer_ids = list(layer_ids)
        self.is_first, self.is_last = is_first, is_last
        # Registered only for what this chunk runs: parameters(), hooks and devices stay per chunk.
        self.layers = nn.ModuleList(model.layers[str(i)] for i in self.layer_ids)
        if is_first:
            self.embed = model.embed
        if is_last:
            self.final_norm = model.final_norm
            if hasattr(model, "lm_head"):
                self.lm_head = model.lm_head
        object.__setattr__(self, "model", model)  # not a submodule: the rank model owns parameters
        self.autocast = autocast

    def forward(self, *inputs: torch.Tensor):
        m = self.model
        with self.autocast():
            if self.is_first:
                (tokens,) = inputs
                hidden = m.embed_tokens(tokens)
            else:
                hidden, tokens = inputs
                tokens = m.sequence.agree(tokens)  # context parallelism: see agree_over_cp
            hidden = m.run_layers(hidden, m.attention_inputs(tokens), self.layer_ids)
            if self.is_last:
                return m.head(hidden)  # this rank's vocabulary shard of the logits
        return hidden, tokens


class PipelineRunner:
    """Runs one training or evaluation iteration (all micro-batches) through the pipeline schedule.
    Every rank of the pipeline group calls it with the same micro-batches; the loss comes from the
    last stage and is broadcast to the whole pipeline group."""

    def __init__(self, model: nn.Module, schedule: str, device: torch.device, n_microbatches: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        layout = model.layout
        self.layout, self.n_microbatches = layout, n_microbatches
        self.fused_cross_entropy = model.config.fused_cross_entropy
        self.sequence = model.sequence
        self.chunks = layout.chunks
        num_stages = layout.pp_size * self.chunks
        self.stages = []
        for stage_index, ids in layout.stage_layer_ids(model.config.num_layers):
            chunk = PipelineChunk(model, ids, stage_index == 0, stage_index == num_stages - 1, autocast)
            self.stages.append(PipelineStage(chunk, stage_index, num_stages, device, group=layout.pp_group))
        self.holds_first = any(s.is_first for s in self.stages)
        self.holds_last = any(s.is_last for s in self.stages)
        self._micro_losses: List[torch.Tensor] = []
        self._divisor = float(n_microbatches)
        self.loss_scale = 1.0  # fp16: the engine's loss scale for the next step (x * 1.0 is exact)
        if self.chunks > 1:
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches, loss_fn=self._loss,
                                                    scale_grads=False)
        elif schedule == "gpipe":
            self.schedule = ScheduleGPipe(self.stages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)
        else:
            self.schedule = Schedule1F1B(self.stages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(logits, self.sequence.chunk(labels), self.layout, self.fused_cross_entropy)
        self._micro_losses.append(loss.detach().float())
        return loss * self.loss_scale / self._divisor

    def _run(self, micro_batches: List[torch.Tensor], train: bool) -> torch.Tensor:
        if len(micro_batches) != self.n_microbatches:
            raise ValueError(f"pipeline schedule was built for {self.n_microbatches} micro-batches, "
                             f"got {len(micro_batches)}")
        tokens, labels = split_batch(torch.cat(micro_batches).to(self.stages[0].device))
        args = (tokens.contiguous(),) if self.holds_first else ()
        target = labels.contiguous() if self.holds_last else None
        self._micro_losses = []
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, return_outputs=False)
        # The first step's metadata inference also calls the loss function (on placeholder data):
        # the real micro-batches are the last n calls.
        real = self._micro_losses[-self.n_microbatches:]
        loss = (torch.stack(real).sum() / len(real) if self.holds_last
                else torch.zeros((), device=tokens.device))
        self._micro_losses = []
        dist.broadcast(loss, src=self.layout.pp_ranks[-1], group=self.layout.pp_group)
        return loss

    def forward_backward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Accumulates gradients of mean(loss over micro-batches); returns that mean loss."""
        return self._run(micro_batches, train=True)

    @torch.no_grad()
    def evaluate(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Mean loss over the micro-batches, forward only."""
        return self._run(micro_batches, train=False)

