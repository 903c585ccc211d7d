"""Item 5 of bench/realmodel.py: greedy decoding at long contexts, three engines, one fresh process per
measurement (so each peak RSS is its own), interleaved (A B C A B C):

* ``ours``: megatron.inference.StreamingEngine over the SepLLM cache a4 s64 w256 c800;
* ``transformers``: stock ``generate()`` of the plain model, its default DynamicCache, full attention, sdpa;
* ``remote``: ``generate()`` of our Sep-Attention export (trust_remote_code) with its SepLLMCache a4 s64 w256 c800.

The context is put into each cache by the cache's own bookkeeping with random keys and values (the
context's real token ids decide separators and evictions), not by a model forward: prefilling 20k
tokens three times per repeat does not fit a shared 2-core machine, and decoding costs the same for
any key values. --prefill-cap N prefills the last N context tokens for real instead, with the model.
Then ``--new-tokens`` tokens are decoded by the model; tokens/s counts the steps after the first.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron.errors import InferenceError

BUDGET = dict(policy="sepllm", init_cache_size=4, sep_cache_size=64, local_size=256, cache_size=800)
RULE = {"mode": "sepllm", "n_init": 4, "n_local": 256}


def log(msg: str) -> None:
    print(msg, flush=True)


def sepllm_export(ckpt: Path, work: Path) -> Path:
    """Our SmolLM2 checkpoint with the Sep-Attention rule RULE, exported with remote code (once)."""
    from realmodel_assets import model_under

    from megatron.checkpointing import read_manifest, resolve_checkpoint_dir, save_checkpoint
    from megatron.config import config_to_tree
    from megatron.convert import export_hf
    from megatron.inference.loading import load_tokenizer

    out = work / "export_sepllm"
    if (out / ".complete").is_file():
        return out
    tokenizer = load_tokenizer(str(ckpt))
    model, cfg = model_under(ckpt, tokenizer, {"impl": "auto", "sepllm": RULE})
    sep_ckpt = work / "ckpt_sepllm"
    extra = read_manifest(resolve_checkpoint_dir(str(ckpt)))["trainer"]
    save_checkpoint(str(sep_ckpt), 0, model, None, extra, config_to_tree(cfg))
    export_hf(str(sep_ckpt), str(out), force=True, tokenizer_dir=str(ckpt / "tokenizer"), progress=False,
              log=log, cache=dict(BUDGET))
    (out / ".complete").write_text("")
    return out


def run_generate(args: argparse.Namespace, ckpt: Path) -> None:
    from realmodel import append_row, read_rows

    work = Path(args.work)
    export = sepllm_export(ckpt, work)
    out = Path(args.results) / "generate.jsonl"
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine not in ("ours", "transformers", "remote"):
            raise InferenceError(f"--engines: unknown engine {engine!r}; expected ours, transformers, remote")
    done = {(r["engine"], r["context"], r["repeat"]) for r in read_rows(out)}
    for context in args.contexts:
        for repeat in range(args.repeats):
            for engine in engines:
                if (engine, context, repeat) in done:
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve().parent / "realmodel.py"),
                       "--results", args.results, "--work", args.work, "generate-one", "--engine", engine,
                       "--context", str(context), "--new-tokens", str(args.new_tokens), "--export-dir", str(export),
                       "--ckpt", str(ckpt)] + (["--prefill-cap", str(args.prefill_cap)] if args.prefill_cap else [])
                if args.text_file:
                    cmd[2:2] = ["--text-file", args.text_file]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise InferenceError(f"generate-one {engine} at {context} failed: {res.stderr.strip()[-800:]}")
                row = {**json.loads(res.stdout.strip().splitlines()[-1]), "repeat": repeat}
                append_row(out, row)
                log(f"  {engine:<12} context {context:>6} repeat {repeat}: {row['decode_tokens_per_s']:.2f} tok/s, "
                    f"KV {row['kv_entries']} entries, peak RSS {row['peak_rss_mb']:.0f} MiB")


def context_ids(args: argparse.Namespace, tokenizer_encode, n: int):
    """``n`` + 1 real tokens: the license texts repeated as often as needed (the last one is decoded from)."""
    from realmodel import text_of

    ids = tokenizer_encode(text_of(args))
    reps = -(-(n + 1) // len(ids))
    return (ids * reps)[:n + 1]


class StepClock:
    """A transformers streamer that notes when each generated token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def random_kv(heads: int, length: int, dim: int, layout: str):
    shape = (1, heads, length, dim) if layout == "bhld" else (1, length, heads, dim)
    return torch.randn(shape), torch.randn(shape)


def fill_ours(engine, ids) -> None:
    """The context into our cache: its bookkeeping with random K/V, piece by piece as forward would."""
    cache, piece = engine.cache, engine.config.max_new_per_forward or len(ids)
    for start in range(0, len(ids), piece):
        tokens = torch.tensor(ids[start:start + piece])
        L = tokens.numel()
        cache.make_room(L)
        n = cache.length
        for layer in engine.layer_ids:
            k, v = random_kv(engine.kv_heads, L, engine.head_dim, "blhd")
            cache.write(layer, k, v, k.clone() if cache.rotary else None)
        stream_pos = torch.arange(engine.stream_position, engine.stream_position + L)
        rotary = torch.arange(cache.rotated_valid, n + L) if engine.config.enable_pos_shift else None
        if rotary is None:
            rotary = torch.cat([cache.positions[cache.rotated_valid:n], stream_pos])
        cache.commit(tokens, stream_pos, engine.separator_table[tokens], rotary)
        engine.stream_position += L


def fill_remote(model, cache, ids) -> None:
    """The context into the export's SepLLMCache: the model's own planning step (ledger, evictions) per
    piece, then random K/V per layer, as its attention would store them."""
    state = model.sepllm_state
    piece = cache.budget.max_new_per_forward or len(ids)
    cfg = model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for start in range(0, len(ids), piece):
        tokens = torch.tensor([ids[start:start + piece]])
        state._plan(tokens, torch.ones_like(tokens, dtype=torch.bool), cache, torch.float32)
        for i, layer in enumerate(cache.layers):
            k, v = random_kv(heads, tokens.shape[1], dim, "bhld")
            layer.update(k, v)
    state.plan = None


def generate_one(args: argparse.Namespace) -> dict:
    from megatron.inference.streaming_eval import memory_mb, reset_peak_rss

    T, N = args.new_tokens, args.context
    real = min(N, args.prefill_cap) if args.prefill_cap else 0
    if args.engine == "ours":
        from megatron.inference import CacheConfig, StreamingEngine
        from megatron.inference.loading import load_model, load_tokenizer

        tokenizer = load_tokenizer(args.ckpt)
        model, _, _ = load_model(args.ckpt, tokenizer)
        ids = context_ids(args, tokenizer.encode, N)
        engine = StreamingEngine(model, CacheConfig(**BUDGET))
        fill_ours(engine, ids[:N - real])
        if real:
            engine.forward(ids[N - real:N])
        loaded = memory_mb()["rss_mb"]
        reset_peak_rss()
        token = int(engine.forward([ids[N]]).argmax())
        times = []
        for _ in range(T - 1):
            token = int(engine.step(token).argmax())
            times.append(time.perf_counter())
        kv_entries, kv_bytes = engine.cache.length, engine.cache.nbytes()
        steps = times
    else:
        import transformers

        remote = args.engine == "remote"
        # One directory for both: without trust_remote_code transformers builds its own LlamaForCausalLM
        # from it (the 'sepllm' entry of config.json is ignored), i.e. the stock model, full attention.
        tok = transformers.AutoTokenizer.from_pretrained(args.export_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.export_dir, trust_remote_code=remote, dtype=torch.float32,
            **({} if remote else {"attn_implementation": "sdpa"})).eval()
        ids = context_ids(args, lambda text: tok(text, add_special_tokens=False)["input_ids"], N)
        if remote:
            cache = model.sepllm_cache()
            fill_remote(model, cache, ids[:N - real])
        else:
            cache = transformers.DynamicCache(config=model.config)
            cfg = model.config
            for i in range(cfg.num_hidden_layers):
                cache.update(*random_kv(cfg.num_key_value_heads, N - real, cfg.hidden_size // cfg.num_attention_heads,
                                        "bhld"), i)
        if real:
            with torch.no_grad():
                model(torch.tensor([ids[N - real:N]]), past_key_values=cache, use_cache=True)
        loaded = memory_mb()["rss_mb"]
        reset_peak_rss()
        clock = StepClock()
        prompt = torch.tensor([ids])
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache, max_new_tokens=T,
                           min_new_tokens=T, do_sample=False, streamer=clock, pad_token_id=tok.eos_token_id)
        steps = clock.times[1:]
        kv_entries = cache.length if remote else cache.get_seq_length()
        kv_bytes = cache.nbytes() if remote else sum(t.numel() * t.element_size() for layer in cache.layers
                                                     for t in (layer.keys, layer.values))
    mem = memory_mb()
    rate = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else float("nan")
    return {"engine": args.engine, "model_class": type(model).__name__, "context": N, "real_prefill": real,
            "new_tokens": T,
            "decode_tokens_per_s": rate, "kv_entries": int(kv_entries), "kv_mb": kv_bytes / 2**20,
            "rss_before_decode_mb": loaded, "peak_rss_mb": mem["peak_rss_mb"], "threads": torch.get_num_threads()}
