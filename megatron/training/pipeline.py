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
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)

from megatron.parallel import get_state, vocab_parallel_cross_entropy


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
            hidden = m.run_layers(hidden, m.attention_inputs(tokens), self.layer_ids)
            if self.is_last:
                return m.head(hidden)  # this rank's vocabulary shard of the logits
        return hidden, tokens


def stage_layer_ids(num_layers: int, pp: int, chunks: int, pp_rank: int) -> List[Tuple[int, List[int]]]:
    """(stage index, global layer ids) of each chunk held by ``pp_rank``; stage s = c * pp + rank."""
    per = num_layers // (pp * chunks)
    out = []
    for c in range(chunks):
        stage = c * pp + pp_rank
        out.append((stage, list(range(stage * per, (stage + 1) * per))))
    return out


class PipelineRunner:
    """Runs one training or evaluation iteration (all micro-batches) through the pipeline schedule.
    Every rank of the pipeline group calls it with the same micro-batches; the loss comes from the
    last stage and is broadcast to the whole pipeline group."""

    def __init__(self, model: nn.Module, cfg, device: torch.device, n_microbatches: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        st = get_state()
        par = cfg.parallel
        self.state, self.n_microbatches = st, n_microbatches
        self.fused_cross_entropy = cfg.model.fused_cross_entropy
        self.chunks = par.virtual_pipe_stages
        num_stages = st.pp_size * self.chunks
        self.stages = []
        for stage_index, ids in stage_layer_ids(cfg.model.num_layers, st.pp_size, self.chunks, st.pp_rank):
            chunk = PipelineChunk(model, ids, stage_index == 0, stage_index == num_stages - 1, autocast)
            self.stages.append(PipelineStage(chunk, stage_index, num_stages, device, group=st.pp_group))
        self.holds_first = any(s.is_first for s in self.stages)
        self.holds_last = any(s.is_last for s in self.stages)
        self._micro_losses: List[torch.Tensor] = []
        self._divisor = float(n_microbatches)
        if self.chunks > 1:
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches, loss_fn=self._loss,
                                                    scale_grads=False)
        elif par.pipe_schedule == "gpipe":
            self.schedule = ScheduleGPipe(self.stages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)
        else:
            self.schedule = Schedule1F1B(self.stages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = vocab_parallel_cross_entropy(logits, labels, fused=self.fused_cross_entropy).mean()
        self._micro_losses.append(loss.detach().float())
        return loss / self._divisor

    def _run(self, micro_batches: List[torch.Tensor], train: bool) -> torch.Tensor:
        if len(micro_batches) != self.n_microbatches:
            raise ValueError(f"pipeline schedule was built for {self.n_microbatches} micro-batches, "
                             f"got {len(micro_batches)}")
        batch = torch.cat(micro_batches).to(self.stages[0].device)
        args = (batch[:, :-1].contiguous(),) if self.holds_first else ()
        target = batch[:, 1:].contiguous() if self.holds_last else None
        self._micro_losses = []
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, return_outputs=False)
        # The first step's metadata inference also calls the loss function (on placeholder data):
        # the real micro-batches are the last n calls.
        real = self._micro_losses[-self.n_microbatches:]
        loss = (torch.stack(real).sum() / len(real) if self.holds_last
                else torch.zeros((), device=batch.device))
        self._micro_losses = []
        if self.state.pp_size > 1:
            dist.broadcast(loss, src=self.state.pp_ranks[-1], group=self.state.pp_group)
        return loss

    def forward_backward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Accumulates gradients of mean(loss over micro-batches); returns that mean loss."""
        return self._run(micro_batches, train=True)

    @torch.no_grad()
    def evaluate(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Mean loss over the micro-batches, forward only."""
        return self._run(micro_batches, train=False)


def pipeline_runner(model: nn.Module, cfg, device: torch.device, n_microbatches: int,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> Optional[PipelineRunner]:
    """A runner when this run is pipelined (pipe_parallel_size > 1), else None."""
    if get_state().pp_size <= 1:
        return None
    return PipelineRunner(model, cfg, device, n_microbatches, autocast)
