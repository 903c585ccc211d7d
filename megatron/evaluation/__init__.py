"""Checkpoint evaluation with lm-evaluation-harness (``eval.py``).

* ``scoring.Scorer`` -- log-likelihoods (batched, right-padded, under the model's own attention rule;
  the streaming KV cache past the training length) and generation, on token ids;
* ``harness.SepLLMEvalLM`` -- the lm-eval ``LM`` around a Scorer and our tokenizer;
* ``local_tasks`` -- the local tasks in ``tasks/`` (lm-eval YAML over local JSONL files);
* ``runner`` -- settings from YAML + command line, model loading with attention overrides, outputs.

``harness`` and ``runner.evaluate`` import lm_eval; ``scoring`` does not.
"""
