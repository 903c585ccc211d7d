"""Streaming inference: bad input, sampling, and the two CLIs on a tiny saved checkpoint."""
import csv
from pathlib import Path

import pytest
import torch
from conftest import load_script, run_cli

from megatron.checkpointing import save_checkpoint
from megatron.config import config_from_tree, config_to_tree
from megatron.errors import InferenceError
from megatron.errors import run_cli as run_entry_point
from megatron.inference import CacheConfig, StreamingEngine
from megatron.inference.generation import TextStreamer, generate_tokens
from megatron.inference.loading import load_model
from megatron.inference.sampling import SamplingConfig, make_generator, sample_next_token
from megatron.model import build_model

TEXT = ("The cat sat on the mat. The dog sat on the log, and the bird sang: la la la!\n"
        "Is it raining? No; it is sunny. ") * 6


def load_tool(name: str):
    return load_script(f"tools/{name}.py")


def exit_code(tool, argv) -> int:
    with pytest.raises(SystemExit) as info:
        run_entry_point(tool.main, argv)
    return info.value.code


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 1-layer random model saved as a checkpoint, with a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("stream_ckpt")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    tree = dict(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=64, rotary_pct=0.5,
                make_vocab_size_divisible_by=8, tokenizer_type="HFTokenizer", vocab_file=str(root / "tokenizer.json"),
                attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 8}})
    cfg = config_from_tree(tree)
    torch.manual_seed(0)
    model = build_model(cfg, 304, [], eod_id=0)
    save_checkpoint(str(root / "save"), 3, model, None, {}, config_to_tree(cfg))
    return root


# ---------------------------------------------------------------- bad input (API)
@pytest.mark.parametrize("kwargs,match", [
    (dict(init_cache_size=4, local_size=10, cache_size=12), "smaller than init_cache_size \\+ local_size"),
    (dict(init_cache_size=4, sep_cache_size=8, local_size=8, cache_size=20), "no room for new tokens"),
    (dict(policy="h2o"), "cache policy must be one of"),
    (dict(decode_mask="dense"), "decode_mask must be one of"),
    (dict(local_size=-1), "must be >= 0"),
])
def test_bad_cache_budget(kwargs, match):
    with pytest.raises(InferenceError, match=match):
        CacheConfig(**kwargs)


def test_streamingllm_budget_ignores_local_size():
    assert CacheConfig("streamingllm", 4, 0, 256, 100).max_new_per_forward == 96
    with pytest.raises(InferenceError, match="init_cache_size < cache_size"):
        CacheConfig("streamingllm", 8, 0, 0, 8)


def test_empty_prompt_and_oversized_chunk():
    tree = dict(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=64)
    engine = StreamingEngine(build_model(config_from_tree(tree), 64, [5]), CacheConfig("sepllm", 2, 2, 4, 10))
    with pytest.raises(InferenceError, match="empty prompt"):
        list(generate_tokens(engine, [], 4))
    with pytest.raises(InferenceError, match="empty input"):
        engine.forward([])
    with pytest.raises(InferenceError, match="at most 2 fit"):
        engine.cache.make_room(3)
    assert engine.forward(list(range(7, 30))).shape == (64,)  # long prompts are split to fit
    assert engine.cache.length <= 10


def test_unknown_checkpoint(tmp_path):
    with pytest.raises(InferenceError, match="unknown checkpoint.*does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(InferenceError, match="unknown checkpoint.*holds no checkpoint"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings(kwargs):
    with pytest.raises(InferenceError):
        SamplingConfig(**kwargs)


# ---------------------------------------------------------------- sampling
def test_sampling_modes():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0, 9.0])
    assert sample_next_token(logits, SamplingConfig(greedy=True)) == 5
    assert sample_next_token(logits, SamplingConfig(temperature=0)) == 5
    assert sample_next_token(logits, SamplingConfig(greedy=True, vocab_limit=5)) == 1  # padded rows ignored
    for kwargs in (dict(top_k=1), dict(top_p=1e-3)):
        cfg = SamplingConfig(seed=3, vocab_limit=5, **kwargs)
        assert {sample_next_token(logits, cfg, make_generator(cfg)) for _ in range(20)} == {1}
    cfg = SamplingConfig(top_k=2, seed=1, vocab_limit=5)
    gen = make_generator(cfg)
    picks = [sample_next_token(logits, cfg, gen) for _ in range(200)]
    assert set(picks) == {1, 3}  # top-2 of the real vocabulary, both about equally likely
    gen = make_generator(cfg)
    assert picks == [sample_next_token(logits, cfg, gen) for _ in range(200)]  # seeded: reproducible


def test_text_streamer_joins_to_full_decode():
    table = {1: "h", 2: "é", 3: " wor", 4: "ld"}
    streamer = TextStreamer(lambda ids: "".join(table[i] for i in ids), tail=2)
    assert "".join(streamer.push(i) for i in [1, 2, 3, 4, 1]) == "hé worldh"


# ---------------------------------------------------------------- CLIs
def test_generate_cli(tiny_checkpoint, capsys):
    gen = load_tool("generate")
    save = str(tiny_checkpoint / "save")
    code = exit_code(gen, ["--load", save, "--prompt", "The cat sat", "--max-new-tokens", "30", "--greedy",
                           "--no-stop", "--cache-size", "16", "--init-cache-size", "2", "--sep-cache-size", "3",
                           "--local-size", "6", "--stats"])
    out = capsys.readouterr()
    assert code == 0, out.err
    # The CLI prints exactly the greedy continuation of the engine under the same cache budget.
    from megatron.inference.loading import load_tokenizer

    tok = load_tokenizer(save)
    model, _, _ = load_model(save, tok)
    engine = StreamingEngine(model, CacheConfig("sepllm", 2, 3, 6, 16))
    greedy = SamplingConfig(greedy=True, vocab_limit=min(tok.vocab_size, model.vocab_size))
    ids = list(generate_tokens(engine, tok.encode("The cat sat"), 30, greedy))
    assert len(ids) == 30 and out.out == tok.decode(ids) + "\n"
    assert "generated 30 in" in out.err and f"{engine.cache.compressions} compressions" in out.err
    assert engine.cache.compressions > 0 and engine.cache.length <= 16
    assert exit_code(gen, ["--load", save, "--prompt", "", "--policy", "full"]) == 2
    assert capsys.readouterr().err.strip() == "error: empty prompt: give some text with --prompt or --prompt-file"
    assert exit_code(gen, ["--load", save, "--prompt", "x", "--cache-size", "8", "--local-size", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "init_cache_size + local_size" in err
    assert exit_code(gen, ["--load", save, "--prompt", "x", "--chat"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: the tokenizer in '{tiny_checkpoint}' has no chat template "
                                               "(chat_template.jinja, chat_template.json or tokenizer_config.json "
                                               "'chat_template')")
    assert exit_code(gen, ["--load", save, "--prompt", "x", "--system", "Be brief."]) == 2
    assert capsys.readouterr().err.strip() == "error: --system needs --chat"


def test_eval_streaming_ppl_cli(tiny_checkpoint, tmp_path, capsys):
    tool = load_tool("eval_streaming_ppl")
    text = tmp_path / "book.txt"
    text.write_text(TEXT)
    out_dir = tmp_path / "out"
    code = exit_code(tool, ["--load", str(tiny_checkpoint / "save"), "--text-file", str(text), "--num-tokens", "90",
                            "--report-every", "30", "--policies", "sepllm,streamingllm,full", "--cache-size", "20",
                            "--init-cache-size", "2", "--sep-cache-size", "4", "--local-size", "8",
                            "--out-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out_dir / "sepllm.csv")))
    assert [int(r["tokens"]) for r in rows] == [30, 60, 90]
    assert max(int(r["kv_len"]) for r in rows) <= 20
    full = list(csv.DictReader(open(out_dir / "full.csv")))
    assert int(full[-1]["kv_len"]) == 90  # one entry per token fed
    assert (out_dir / "streaming_ppl.png").stat().st_size > 1000
    assert exit_code(tool, ["--load", str(tiny_checkpoint / "save"), "--text-file", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err


def streaming_rows(tool, ckpt, text, out_dir, policy, chunk, capsys, *budget):
    code = exit_code(tool, ["--load", ckpt, "--text-file", str(text), "--num-tokens", "90", "--report-every", "30",
                            "--policies", policy, "--chunk", str(chunk), "--out-dir", str(out_dir), *budget])
    assert code == 0, capsys.readouterr().err
    return list(csv.DictReader(open(out_dir / f"{policy}.csv")))


@pytest.mark.parametrize("policy,budget", [
    ("full", ()),
    # every eviction drops only keys the Sep-Attention rule (n_init 2, n_local 8) hides
    ("sepllm", ("--decode-mask", "rule", "--no-pos-shift", "--init-cache-size", "2", "--sep-cache-size", "40",
                "--local-size", "8", "--cache-size", "66")),
])
def test_eval_streaming_ppl_chunked_equals_token_by_token(tiny_checkpoint, tmp_path, capsys, policy, budget):
    tool = load_tool("eval_streaming_ppl")
    text = tmp_path / "book.txt"
    text.write_text(TEXT)
    ckpt = str(tiny_checkpoint / "save")
    one = streaming_rows(tool, ckpt, text, tmp_path / "one", policy, 1, capsys, *budget)
    chunked = streaming_rows(tool, ckpt, text, tmp_path / "chunked", policy, 7, capsys, *budget)
    assert [int(r["tokens"]) for r in chunked] == [int(r["tokens"]) for r in one] == [30, 60, 90]
    for a, b in zip(one, chunked):
        assert float(b["ppl"]) == pytest.approx(float(a["ppl"]), rel=1e-5)
        assert float(b["ppl_cumulative"]) == pytest.approx(float(a["ppl_cumulative"]), rel=1e-5)
        assert b["full_kv_avg"] == a["full_kv_avg"]
    if policy == "full":
        assert [(r["kv_len"], r["kv_len_avg"]) for r in chunked] == [(r["kv_len"], r["kv_len_avg"]) for r in one]
    else:
        assert int(one[-1]["compressions"]) > 0 and int(chunked[-1]["compressions"]) > 0
        assert max(int(r["kv_len"]) for r in chunked) <= 66
    assert exit_code(tool, ["--load", ckpt, "--text-file", str(text), "--chunk", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --chunk must be >= 1, got 0"


def test_cli_unknown_checkpoint_subprocess(tmp_path):
    proc = run_cli(["tools/generate.py", "--load", str(tmp_path / "nope"), "--prompt", "hi"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown checkpoint") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
