"""The training loop: setup (distributed, tokenizer, data, model, optimizer, resume), steps, eval, saves."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from megatron.checkpointing import ensure_writable, save_checkpoint
from megatron.config import Config, config_to_tree, validate_launch
from megatron.data import build_dataset, build_train_valid_test_datasets
from megatron.errors import DataError
from megatron.model import build_model, num_parameters
from megatron.parallel import layout_from_config
from megatron.parallel.distributed import device_for_rank, init_distributed, rank
from megatron.tokenizer import build_tokenizer, padded_vocab_size
from megatron.training.batches import collate, global_batch_indices, train_batches
from megatron.training.lr_schedule import LRSchedule
from megatron.training.metrics import MetricsLogger
from megatron.training.optimizer import build_optimizer
from megatron.training.resume import build_engine_and_resume


def check_data_prefix(prefix: str, key: str) -> None:
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise DataError(f"{key} '{prefix}': file '{prefix}{ext}' not found; expected an indexed "
                            "dataset made by tools/preprocess_data.py")


class Trainer:
    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg = cfg
        validate_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
        self.world = init_distributed(cfg.parallel.distributed_backend)
        self.layout = layout_from_config(cfg, self.world, rank(), groups=True)
        self.dp_size = self.layout.dp_size
        self.is_logger = rank() == self.world - 1 if self.layout.pp_size > 1 else rank() == 0
        self._print = log
        self.device = device_for_rank()
        torch.manual_seed(cfg.training.seed)
        tr = cfg.training
        self.micro, self.accum = tr.train_micro_batch_size_per_gpu, tr.gradient_accumulation_steps
        self.global_batch = self.micro * self.accum * self.dp_size
        self.iteration, self.consumed_samples = 0, 0

        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
                                            cfg.parallel.model_parallel_size)
        sep = cfg.attention.sepllm
        self.separator_ids = (sep.separator_ids if sep.separator_ids is not None else
                              self.tokenizer.separator_ids(sep.separator_tokens, sep.include_space_prefixed))
        self.build_data()
        if cfg.checkpoint.save:
            ensure_writable(cfg.checkpoint.save)
        self.model = build_model(cfg, self.vocab_size, self.separator_ids, self.tokenizer.eod_id,
                                 self.layout).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule.from_config(cfg)
        # Data/pipeline/ZeRO step logic (megatron/training/engines.py), and the checkpoint it resumes.
        self.engine, manifest = build_engine_and_resume(cfg, self.model, self.optimizer, self.device, self.autocast)
        if manifest is not None:
            self.log_resume(manifest)
        self.metrics = MetricsLogger(cfg, self.is_logger, config_to_tree(cfg))
        self.log(f"model: {num_parameters(self.model) / 1e6:.2f}M parameters on this rank, vocab "
                 f"{self.vocab_size}, {len(self.separator_ids)} separator ids, layout tp="
                 f"{self.layout.tp_size} pp={self.layout.pp_size} dp={self.dp_size} cp={self.layout.cp_size}, "
                 f"device {self.device}")
        self.node_log(f"joined: tp rank {self.layout.tp_rank}, pp rank {self.layout.pp_rank}, dp rank "
                      f"{self.layout.dp_rank}, device {self.device}")

    def log(self, msg: str) -> None:
        if self.is_logger:
            self._print(msg)

    def node_log(self, msg: str) -> None:
        """One line from the first process of every other node, so each node's output shows it took part."""
        local, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        node_first = rank() - local
        logger = self.world - 1 if self.layout.pp_size > 1 else 0
        if self.world > 1 and local == 0 and not node_first <= logger < node_first + local_world:
            self._print(f"[rank {rank()} on {socket.gethostname()}] {msg}")

    # ------------------------------------------------------------------ data
    def build_data(self) -> None:
        cfg, tr, d = self.cfg, self.cfg.training, self.cfg.data
        seq = cfg.model.seq_length
        n_train = tr.train_iters * self.global_batch
        n_eval = max(1, tr.eval_iters) * self.global_batch
        evals = (tr.train_iters // max(1, tr.eval_interval) + 1) * n_eval
        if d.train_data_paths:
            for i, p in enumerate(d.train_data_paths + (d.valid_data_paths or [])):
                check_data_prefix(p, "train_data_paths" if i < len(d.train_data_paths) else "valid_data_paths")
            self.train_ds = build_dataset(d.train_data_paths, d.train_data_weights, seq, tr.seed, n_train,
                                          d.data_cache_dir)
            self.valid_ds = (build_dataset(d.valid_data_paths, None, seq, tr.seed, evals, d.data_cache_dir)
                             if d.valid_data_paths else None)
        elif d.data_path:
            check_data_prefix(d.data_path, "data_path")
            self.train_ds, self.valid_ds, _ = build_train_valid_test_datasets(
                [d.data_path], None, d.split, seq, tr.seed, (n_train, evals, 0), d.data_cache_dir)
        else:
            raise DataError("no training data: set 'data_path' or 'train_data_paths'")
        if self.train_ds is None:
            raise DataError(f"split '{d.split}' leaves no training documents")

    # ------------------------------------------------------------- resume
    def log_resume(self, manifest: dict) -> None:
        load = self.cfg.checkpoint.load
        if self.cfg.checkpoint.finetune:
            self.log(f"finetune: loaded weights from {load}; optimizer, iteration and data position reset")
            return
        self.iteration = manifest["iteration"]
        self.consumed_samples = manifest["trainer"]["consumed_samples"]
        self.log(f"resumed from {load} at iteration {self.iteration} "
                 f"({self.consumed_samples} samples consumed)")

    def save(self) -> None:
        ck = self.cfg.checkpoint
        path = save_checkpoint(ck.save, self.iteration, self.model, self.engine.optimizer_state(),
                               {"consumed_samples": self.consumed_samples}, config_to_tree(self.cfg),
                               ck.keep_last_n_checkpoints)
        self.log(f"saved checkpoint {path}")

    # ---------------------------------------------------------------- step
    def autocast(self):
        if self.cfg.training.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, micro_batches: List[torch.Tensor]) -> Dict[str, float]:
        lr = self.schedule.lr_at(self.iteration + 1)
        stats = self.engine.train_step(micro_batches, lr)  # DP/TP/PP reduction, clipping, step
        self.iteration += 1
        self.consumed_samples += self.global_batch
        return stats

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_ds is None or self.cfg.training.eval_iters < 1:
            return None
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for it in range(self.cfg.training.eval_iters):
            micro_batches = [collate(self.valid_ds, idx) for idx in global_batch_indices(
                it * self.global_batch, self.global_batch, self.micro, self.accum, self.dp_size,
                self.layout.dp_rank, len(self.valid_ds))]
            total += self.engine.eval_loss(micro_batches)  # averaged over data-parallel ranks
        self.model.train()
        return float(total / self.cfg.training.eval_iters)

    # ---------------------------------------------------------------- loop
    def train(self) -> List[float]:
        cfg = self.cfg
        tr, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
        batches = train_batches(self.train_ds, self.consumed_samples, self.micro, self.accum,
                                self.dp_size, self.layout.dp_rank)
        tokens_per_iter = self.global_batch * cfg.model.seq_length
        losses: List[float] = []
        self.model.train()
        window_time, window_iters = 0.0, 0  # training time only: evaluation and saving are not counted
        self.log(f"training iterations {self.iteration + 1}..{tr.train_iters}, global batch "
                 f"{self.global_batch} x {cfg.model.seq_length} tokens")
        start_iteration, saved = self.iteration, False
        while self.iteration < tr.train_iters:
            step_start = time.perf_counter()
            stats = self.train_step(next(batches))
            window_time += time.perf_counter() - step_start
            losses.append(stats["loss"])
            window_iters += 1
            if self.iteration % lg.log_interval == 0 or self.iteration == tr.train_iters:
                # Logged loss: mean over the logging window (Megatron's "lm loss"); last step's kept too.
                stats["last_loss"] = stats["loss"]
                stats["loss"] = sum(losses[-window_iters:]) / window_iters
                stats["tokens_per_sec"] = tokens_per_iter * window_iters / window_time
                stats["iter_time"] = window_time / window_iters
                self.log(f"iter {self.iteration:6d}/{tr.train_iters} | loss {stats['loss']:.4f} | lr "
                         f"{stats['lr']:.3e} | grad_norm {stats['grad_norm']:.3f} | tokens/s "
                         f"{stats['tokens_per_sec']:.0f} | {stats['iter_time'] * 1000:.0f} ms/iter")
                self.metrics.log(self.iteration, stats)
                window_time, window_iters = 0.0, 0
            if tr.eval_interval and self.iteration % tr.eval_interval == 0:
                val = self.evaluate()
                if val is not None:
                    self.log(f"iter {self.iteration:6d} | validation loss {val:.4f} | "
                             f"ppl {torch.tensor(val).exp():.2f}")
                    self.metrics.log(self.iteration, {"loss": val}, prefix="valid")
            saved = bool(ck.save and ck.checkpoint_factor and self.iteration % ck.checkpoint_factor == 0)
            if saved:
                self.save()
            if tr.exit_interval and self.iteration % tr.exit_interval == 0:
                if ck.save and not saved:
                    self.save()
                self.log(f"exit_interval {tr.exit_interval} reached at iteration {self.iteration}")
                break
        else:
            if ck.save and self.iteration > start_iteration and not saved:
                self.save()
        self.metrics.close()
        self.node_log(f"finished at iteration {self.iteration}")
        return losses

