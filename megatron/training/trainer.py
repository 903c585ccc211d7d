"""The training loop: setup (distributed, tokenizer, data, model, optimizer, resume), steps, eval, saves."""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from megatron.attention.dispatch import check_impl_available
from megatron.checkpointing import ensure_writable, resolve_checkpoint_dir, save_checkpoint
from megatron.checkpointing.checkpoint import checkpoint_at_step
from megatron.checkpointing.session import SaveSession
from megatron.config import Config, config_to_tree, validate_device, validate_launch
from megatron.data import MMapIndexedDataset, build_dataset, build_train_valid_test_datasets
from megatron.data.token_range import check_token_ids
from megatron.errors import ConfigError, DataError
from megatron.kernels.dispatch import interpret_enabled
from megatron.model import build_model, num_parameters
from megatron.model.attention_plan import resolve_attention_plan
from megatron.parallel import layout_from_config
from megatron.parallel.distributed import device_for_rank, init_distributed, rank
from megatron.tokenizer import build_tokenizer, padded_vocab_size
from megatron.training.batches import collate, global_batch_indices, train_batches
from megatron.training.checkpoint_checks import forward_record, on_save_schedule, validate_loaded
from megatron.training.exit_signals import agreed_exit_signal, deferred_exit_signals, signal_name
from megatron.training.guards import NonFiniteGuard, TrainingDiverged, non_finite_state
from megatron.training.loss_scaler import log_suffix
from megatron.training.lr_schedule import LRSchedule
from megatron.training.metrics import MetricsLogger
from megatron.training.norm_stats import OptionalLogs
from megatron.training.optimizer import build_optimizer
from megatron.training.profiling import RunProfiler
from megatron.training.resume import build_engine_and_resume, nothing_to_load
from megatron.training.summary import parameter_counts, summary_lines
from megatron.training.throughput import Throughput, device_peak_tflops, kept_fractions


def check_data_prefix(prefix: str, key: str, vocab_size: int) -> None:
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise DataError(f"{key} '{prefix}': file '{prefix}{ext}' not found; expected an indexed "
                            "dataset made by tools/preprocess_data.py")
    # Token ids against the vocabulary, from the cached range (not a scan per run).
    check_token_ids(prefix, vocab_size, key, lambda: MMapIndexedDataset(prefix).token_array)


class Trainer:
    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg = cfg
        validate_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
        # ZeRO runs on DeepSpeed, which needs a process group even for one process.
        self.world = init_distributed(cfg.parallel.distributed_backend,
                                      single_rank_group=cfg.parallel.zero_optimization.stage > 0, log=log)
        self.layout = layout_from_config(cfg, self.world, rank(), groups=True)
        self.dp_size = self.layout.dp_size
        self.is_logger = rank() == self.world - 1 if self.layout.pp_size > 1 else rank() == 0
        self._print = log
        self.device = device_for_rank()
        # What this device cannot run (e.g. 'triton' on CPU): one line, not mid-run. ZeRO with fp16 is
        # validate_launch's (it asks DeepSpeed's accelerator).
        validate_device(cfg, self.device.type, triton_interpreter=interpret_enabled())
        check_impl_available(cfg.attention.impl, self.device)
        torch.manual_seed(cfg.training.seed)
        tr = cfg.training
        self.micro, self.accum = tr.train_micro_batch_size_per_gpu, tr.gradient_accumulation_steps
        self.global_batch = self.micro * self.accum * self.dp_size
        self.iteration, self.consumed_samples = 0, 0
        self.stop_signal = 0  # the signal that stopped training after a checkpoint (0: it was not stopped)
        if cfg.checkpoint.iteration is not None:  # NeoX's step to load
            cfg.checkpoint.load = checkpoint_at_step(cfg.checkpoint.load, cfg.checkpoint.iteration)
        self.session = self.open_save_session()  # own `save:` before doing anything
        self.guard = NonFiniteGuard(tr.max_skipped_steps, self.log)

        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
                                            cfg.parallel.model_parallel_size)
        self.plan = resolve_attention_plan(cfg.model, cfg.attention.sepllm, self.tokenizer)
        self.build_data()
        self.model = build_model(cfg, self.vocab_size, self.plan, self.tokenizer.eod_id, self.layout).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule.from_config(cfg)
        # Data/pipeline/ZeRO step logic (megatron/training/engines.py), and the checkpoint it resumes.
        self.engine, manifest = build_engine_and_resume(cfg, self.model, self.optimizer, self.device, self.autocast,
                                                        log=self.log)
        if manifest is not None:
            self.log_resume(manifest)
            validate_loaded(self, manifest, self.log)
        self.optional_logs = OptionalLogs(cfg, self.model, self.engine, self.global_batch, self.device)
        self.metrics = MetricsLogger(cfg, self.is_logger, config_to_tree(cfg), log=self.log)
        self.profiler = RunProfiler(cfg.logging, self.device, rank(), self.log, self.iteration)
        # eval_tasks: megatron.evaluation.during_training.TaskEvaluator, attached by train.py (evaluation
        # sits above training); every rank calls it at each eval_interval.
        self.task_evaluator: Optional[Callable[[int], Dict[str, float]]] = None
        self.log(f"model: {num_parameters(self.model) / 1e6:.2f}M parameters on this rank, vocab "
                 f"{self.vocab_size}, {len(self.plan.separator_list)} separator ids, layout tp="
                 f"{self.layout.tp_size} pp={self.layout.pp_size} dp={self.dp_size} cp={self.layout.cp_size}, "
                 f"device {self.device}")
        self.log_run_summary()
        self.node_log(f"joined: tp rank {self.layout.tp_rank}, pp rank {self.layout.pp_rank}, dp rank "
                      f"{self.layout.dp_rank}, device {self.device}")

    @property
    def separator_ids(self) -> List[int]:
        """The separator token ids this run's Sep-Attention uses (its attention plan's)."""
        return self.plan.separator_list

    def log(self, msg: str) -> None:
        if self.is_logger:
            self._print(msg)

    # ------------------------------------------------------------- what this run does, in words; throughput
    def log_run_summary(self) -> None:
        cfg = self.cfg
        counts = parameter_counts(cfg, self.vocab_size, self.plan)
        for line in summary_lines(cfg, counts, self.vocab_size, self.tokenizer, self.plan, self.dp_size):
            self.log(line)
        peak = cfg.logging.peak_theoretical_tflops or device_peak_tflops(cfg.training.precision, self.device)
        self.throughput = Throughput(counts["matmul"], cfg.model.num_attention_heads * cfg.model.head_dim,
                                     cfg.model.seq_length, self.global_batch * cfg.model.seq_length,
                                     self.world, peak, self.iteration, cfg.training.train_iters, self.device)
        self.log("FLOPs: model FLOPs (6N + attention; Sep-Attention layers counted at their kept fraction of "
                 "causal attention)" + (f", MFU against {peak:g} TFLOPS per device" if peak else
                                        "; set peak_theoretical_tflops for MFU"))

    @cached_property
    def _separator_id_tensor(self) -> torch.Tensor:
        return torch.tensor(self.plan.separator_list, dtype=torch.long)

    def kept_fractions(self, micro_batch: torch.Tensor):
        return kept_fractions(micro_batch[:, :-1], list(self.plan.rules), self._separator_id_tensor,
                              self.tokenizer.eod_id)

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
        self.test_ds = None
        if d.train_data_paths:
            named = [(k, p) for k in ("train_data_paths", "valid_data_paths", "test_data_paths")
                     for p in getattr(d, k) or []]
            for key, p in named:
                check_data_prefix(p, key, self.vocab_size)
            self.train_ds = build_dataset(d.train_data_paths, d.train_data_weights, seq, tr.seed, n_train,
                                          d.data_cache_dir, warn=self.log)
            self.valid_ds = (build_dataset(d.valid_data_paths, None, seq, tr.seed, evals, d.data_cache_dir,
                                           warn=self.log) if d.valid_data_paths else None)
            self.test_ds = (build_dataset(d.test_data_paths, None, seq, tr.seed, n_eval, d.data_cache_dir,
                                          warn=self.log) if d.test_data_paths else None)
        elif d.data_path:
            check_data_prefix(d.data_path, "data_path", self.vocab_size)
            self.train_ds, self.valid_ds, self.test_ds = build_train_valid_test_datasets(
                [d.data_path], None, d.split, seq, tr.seed, (n_train, evals, n_eval), d.data_cache_dir, warn=self.log)
        else:
            raise DataError("no training data: set 'data_path' or 'train_data_paths'")
        if self.train_ds is None:
            raise DataError(f"split '{d.split}' leaves no training documents")

    # ------------------------------------------------------------- save dir
    def open_save_session(self) -> Optional[SaveSession]:
        """Lock the save directory (a second run fails here, naming the holder), clean leftovers of
        dead runs, and note the loaded checkpoint for lineage pruning (megatron/checkpointing/session.py)."""
        ck = self.cfg.checkpoint
        if not ck.save:
            return None
        ensure_writable(ck.save)
        loaded = resolve_checkpoint_dir(ck.load) if ck.load and not nothing_to_load(ck.load) else None
        return SaveSession.open(ck.save, loaded, self.log)

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
        optimizer_state = self.engine.optimizer_state()
        bad = non_finite_state(self.model, optimizer_state, self.device)
        if bad:  # nothing non-finite is ever saved
            raise TrainingDiverged(f"not saving the checkpoint of iteration {self.iteration}: {bad}; "
                                   f"the last good checkpoint is {self.guard.last_checkpoint or 'none'}")
        path = save_checkpoint(ck.save, self.iteration, self.model, optimizer_state,
                               {"consumed_samples": self.consumed_samples, **forward_record(self)},
                               config_to_tree(self.cfg),
                               ck.keep_last_n_checkpoints, session=self.session)
        self.guard.last_checkpoint = str(path)
        self.log(f"saved checkpoint {path}")

    # ---------------------------------------------------------------- step
    def autocast(self):
        if self.cfg.training.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.cfg.training.precision == "fp16":  # fp32 weights, fp16 compute; loss scaling in the engine
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def train_step(self, micro_batches: List[torch.Tensor]) -> Dict[str, float]:
        lr = self.schedule.lr_at(self.iteration + 1)
        stats = self.engine.train_step(micro_batches, lr)  # DP/TP/PP reduction, clipping, step
        self.iteration += 1
        self.consumed_samples += self.global_batch
        return stats

    @torch.no_grad()
    def evaluate(self, dataset=None) -> Optional[float]:
        dataset = self.valid_ds if dataset is None else dataset
        if dataset is None or self.cfg.training.eval_iters < 1:
            return None
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for it in range(self.cfg.training.eval_iters):
            micro_batches = [collate(dataset, idx) for idx in global_batch_indices(
                it * self.global_batch, self.global_batch, self.micro, self.accum, self.dp_size,
                self.layout.dp_rank, len(dataset))]
            total += self.engine.eval_loss(micro_batches)  # averaged over data-parallel ranks
        self.model.train()
        return float(total / self.cfg.training.eval_iters)

    def test(self) -> None:
        """NeoX's end-of-training evaluation on the test set (test_data_paths or the split's third part)."""
        loss = self.evaluate(self.test_ds) if self.test_ds is not None else None
        if loss is not None:
            self.log(f"iter {self.iteration:6d} | test loss {loss:.4f} | ppl {torch.tensor(loss).exp():.2f}")
            self.metrics.log(self.iteration, {"loss": loss, "ppl": math.exp(loss)}, prefix="test")

    def log_kv_ratio(self, micro_batch: torch.Tensor) -> None:
        """The SepLLM reference's PRINT_KV_RATIO: kept fraction of causal attention, per group of layers."""
        fractions = self.kept_fractions(micro_batch)
        sparse = [f for f, r in zip(fractions, self.plan.rules) if not r.is_full]
        if sparse:
            self.log(f"iter {self.iteration:6d} | sep-attention kept {100 * sum(sparse) / len(sparse):.1f}% of "
                     f"causal attention in {len(sparse)} layers, {100 * sum(fractions) / len(fractions):.1f}% "
                     "over all layers")

    # ---------------------------------------------------------------- loop
    def train(self) -> List[float]:
        try:
            with deferred_exit_signals():  # SIGTERM/SIGINT/SIGUSR1: save and stop after the current step
                return self.train_loop()
        finally:
            self.profiler.close()
            self.metrics.close()
            if self.session is not None:
                self.session.close()

    def train_loop(self) -> List[float]:
        cfg = self.cfg
        tr, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
        if tr.eval_tasks and self.task_evaluator is None:
            raise ConfigError("eval_tasks needs the task evaluator, which train.py attaches "
                              "(megatron.evaluation.during_training.TaskEvaluator)")
        batches = train_batches(self.train_ds, self.consumed_samples, self.micro, self.accum,
                                self.dp_size, self.layout.dp_rank, num_workers=cfg.data.num_workers,
                                steps=tr.train_iters - self.iteration)
        tokens_per_iter = self.global_batch * cfg.model.seq_length
        losses: List[float] = []
        self.model.train()
        window_time, window_iters = 0.0, 0  # training time only: evaluation and saving are not counted
        self.log(f"training iterations {self.iteration + 1}..{tr.train_iters}, global batch "
                 f"{self.global_batch} x {cfg.model.seq_length} tokens")
        start_iteration, saved, save_due = self.iteration, False, False
        if ck.save and self.iteration == 0 and 0 in ck.extra_save_iters:
            self.save()  # NeoX's step-0 checkpoint (the initialisation)
        while self.iteration < tr.train_iters:
            step_start = time.perf_counter()
            micro_batches = next(batches)
            self.profiler.before_step(self.iteration + 1)
            self.optional_logs.logging_step = self.is_log_iteration(self.iteration + 1)
            stats = self.train_step(micro_batches)
            self.optional_logs.after_step(stats)
            self.profiler.after_step(self.iteration)
            window_time += time.perf_counter() - step_start
            stats = self.guard.after_step(self.iteration, stats)  # skipped steps counted; stops a divergence
            losses.append(stats["loss"])
            window_iters += 1
            if self.is_log_iteration(self.iteration):
                # Logged loss: mean over the logging window (Megatron's "lm loss"), non-finite losses of
                # skipped steps left out; last step's kept too.
                finite = [x for x in losses[-window_iters:] if math.isfinite(x)]
                stats["last_loss"] = stats["loss"]
                stats["loss"] = sum(finite) / len(finite) if finite else float("nan")
                stats["tokens_per_sec"] = tokens_per_iter * window_iters / window_time
                stats["iter_time"] = window_time / window_iters
                stats.update(self.throughput.report(self.iteration, window_time, window_iters,
                                                    self.kept_fractions(micro_batches[-1])))
                if self.optional_logs.enabled:
                    stats.update(self.optional_logs.collect())  # collective
                self.log(f"iter {self.iteration:6d}/{tr.train_iters} | loss {stats['loss']:.4f} | lr "
                         f"{stats['lr']:.3e} | grad_norm {stats['grad_norm']:.3f} | tokens/s "
                         f"{stats['tokens_per_sec']:.0f} | {stats['iter_time'] * 1000:.0f} ms/iter | "
                         + Throughput.text(stats) + log_suffix(stats) + OptionalLogs.text(stats))
                self.metrics.log(self.iteration, stats)
                window_time, window_iters = 0.0, 0
            if tr.eval_interval and self.iteration % tr.eval_interval == 0:
                val = self.evaluate()
                if val is not None:
                    self.log(f"iter {self.iteration:6d} | validation loss {val:.4f} | "
                             f"ppl {torch.tensor(val).exp():.2f}")
                    self.metrics.log(self.iteration, {"loss": val, "ppl": math.exp(val)}, prefix="valid")
                if tr.eval_tasks:
                    self.log_eval_tasks()
            if lg.kv_ratio_interval and self.iteration % lg.kv_ratio_interval == 0:
                self.log_kv_ratio(micro_batches[-1])
            on_schedule = on_save_schedule(ck, self.iteration)
            save_due = save_due or bool(ck.save and (on_schedule or self.iteration in ck.extra_save_iters))
            saved = save_due and not self.guard.in_skip_streak  # after skipped steps: at the next good one
            if saved:
                self.save()
                save_due = False
            if tr.exit_interval and self.iteration % tr.exit_interval == 0:
                if ck.save and not saved:
                    self.save()
                self.log(f"exit_interval {tr.exit_interval} reached at iteration {self.iteration}")
                break
            signum = agreed_exit_signal(self.device)  # every rank stops after the same step
            if signum:
                self.stop_on_signal(signum, saved)
                break
        else:
            if ck.save and self.iteration > start_iteration and not saved:
                self.save()
            self.test()
        self.node_log(f"finished at iteration {self.iteration}")
        return losses

    def log_eval_tasks(self) -> None:
        results = self.task_evaluator(self.iteration)  # collective; the numbers on the logging rank
        if results:
            self.log(f"iter {self.iteration:6d} | eval tasks | "
                     + " | ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
            self.metrics.log(self.iteration, results, prefix="valid")

    def is_log_iteration(self, iteration: int) -> bool:
        return iteration % self.cfg.logging.log_interval == 0 or iteration == self.cfg.training.train_iters

    def stop_on_signal(self, signum: int, saved: bool) -> None:
        ck = self.cfg.checkpoint
        if ck.save and not saved:
            self.save()
        self.stop_signal = signum
        where = (f"checkpoint {self.guard.last_checkpoint} saved; resume with load: {ck.save}" if ck.save
                 else "no 'save' directory configured, nothing saved")
        self.log(f"stopped by {signal_name(signum)} after iteration {self.iteration}: {where}")
