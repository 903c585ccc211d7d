"""Our model as an lm-evaluation-harness language model (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``).

Tokenization and the context/continuation split are lm-eval's own (``TemplateLM``: trailing spaces of
the context move to the continuation, the pair is encoded whole and split, an empty context becomes
the end-of-text token), so the requests are the tokens lm-eval's ``hf`` model would score. Scoring is
``megatron.evaluation.scoring.Scorer``: batched forwards under the model's own attention rule, the
streaming KV cache past the training length.

Data parallel: launched with several ranks (``deepy.py --num-procs N eval.py ...``), every rank holds
the whole model and lm-eval gives each its share of the requests; results are gathered on rank 0.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from megatron.errors import InferenceError
from megatron.evaluation.scoring import Scorer
from megatron.inference.sampling import SamplingConfig
from megatron.progress import Progress

DEFAULT_MAX_GEN_TOKS = 256


class SepLLMEvalLM(TemplateLM):
    """lm-eval ``LM`` over a loaded GPTModel and our tokenizer."""

    def __init__(self, scorer: Scorer, tokenizer, info: Optional[Dict[str, Any]] = None,
                 progress: bool = True, distributed: bool = True):
        super().__init__()
        self.scorer = scorer
        self.our_tokenizer = tokenizer
        self.info = dict(info or {})
        self.progress = progress
        self._device = scorer.device
        if distributed and dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return self.our_tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.our_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.our_tokenizer.decode(tokens)

    def get_model_info(self) -> Dict[str, Any]:
        return dict(self.info)

    def _bar(self, total: int, desc: str, disable: bool) -> Progress:
        return Progress(desc, total=total, unit="requests", enabled=not disable and self.progress and self.rank == 0)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """``requests``: ((context, continuation) strings or None, context ids, continuation ids)."""
        bar = self._bar(len(requests), "loglikelihood", disable_tqdm)
        try:
            results = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests], on_done=bar.update)
        finally:
            bar.close()
        for (strings, _, _), res in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Sum of log p over every token of each string, the first conditioned on end-of-text. Within the
        training length: one forward; longer: one stream through the KV cache (``long_context="stream"``)
        or lm-eval's disjoint windows of ``max_length`` tokens (``"truncate"``, as the ``hf`` model)."""
        pieces: List[Tuple[int, Tuple[List[int], List[int]]]] = []
        for idx, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            if not tokens:
                continue
            if self.scorer.long_context == "truncate":
                windows = lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
                pieces += [(idx, lm_utils.make_disjoint_window(w)) for w in windows]
            else:
                pieces.append((idx, ([self.prefix_token_id], tokens)))
        bar = self._bar(len(pieces), "loglikelihood_rolling", disable_tqdm)
        try:
            scores = self.scorer.loglikelihoods([p for _, p in pieces], on_done=bar.update)
        finally:
            bar.close()
        totals = [0.0] * len(requests)
        for (idx, _), (logprob, _) in zip(pieces, scores):
            totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Continuation text of each context, cut at the first stop string; greedy unless the task asks
        for sampling (``do_sample`` with ``temperature``/``top_k``/``top_p``)."""
        eos = self.tok_decode([self.eot_token_id])
        out: List[str] = []
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for req in requests:
            context, gen_kwargs = req.args
            until, max_new, sampling = self._generation_settings(dict(gen_kwargs or {}), eos)

            def should_stop(ids: List[int]) -> bool:
                text = self.tok_decode(ids)
                return any(s in text for s in until)

            ids = self.scorer.generate(self.tok_encode(context) or [self.prefix_token_id], max_new, should_stop,
                                       sampling, stop_ids=[self.eot_token_id])
            text = self.tok_decode(ids)
            cut = min((text.index(s) for s in until if s in text), default=len(text))
            out.append(text[:cut])
            self.cache_hook.add_partial("generate_until", req.args, out[-1])
            bar.update(1)
        bar.close()
        return out

    def _generation_settings(self, kwargs: Dict[str, Any], eos: str) -> Tuple[List[str], int, SamplingConfig]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(s, str) for s in until):
            raise InferenceError(f"generation_kwargs 'until' must be a string or a list of strings, got {until!r}")
        until = [s for s in until + [eos] if s]
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kwargs.pop("do_sample", temperature > 0))
        sampling = SamplingConfig(greedy=not do_sample or temperature == 0.0, temperature=temperature or 1.0,
                                  top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                  seed=int(kwargs.pop("seed", 0) or 0))
        return until, max_new, sampling

    # ------------------------------------------------------------------ data parallel
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        flat = tensor.reshape(-1)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
