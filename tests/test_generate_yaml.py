"""generate.py driven by NeoX's text_generation.yml keys: every text_gen_type, NeoX's JSON-lines output,
and the same completions as tools/generate.py for the same settings (greedy and seeded sampling)."""
import io
import json

import pytest
import yaml
from conftest import TOKENIZER, load_script

from megatron.errors import run_cli as run_entry_point

PROMPTS = ["The simple form of assert", "Assert statements are a convenient way", "import os"]


def exit_code(module, argv) -> int:
    with pytest.raises(SystemExit) as info:
        run_entry_point(module.main, argv)
    return info.value.code


def text_generation_yml(tmp_path, ckpt, **keys) -> str:
    """NeoX's configs/text_generation.yml, with our paths."""
    tree = {"load": str(ckpt), "vocab_file": str(TOKENIZER), "tokenizer_type": "HFTokenizer",
            "text_gen_type": "input-file", "maximum_tokens": 12, "prompt_end": "\n", "temperature": 0.0,
            "top_p": 0.0, "top_k": 0, "recompute": False, "num_samples": 2,
            "sample_input_file": str(tmp_path / "sample_input.txt"),
            "sample_output_file": str(tmp_path / "sample_output.txt"), **keys}
    (tmp_path / "sample_input.txt").write_text("\n".join(PROMPTS) + "\n\n")
    path = tmp_path / f"text_generation_{len(list(tmp_path.glob('*.yml')))}.yml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def samples(path) -> list:
    return [json.loads(line) for line in open(path)]


def tool_text(ckpt, prompt, flags, capsys) -> str:
    capsys.readouterr()
    assert exit_code(load_script("tools/generate.py"), ["--load", str(ckpt), "--prompt", prompt, *flags]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("keys, flags", [
    ({}, ["--greedy", "--max-new-tokens", "12"]),
    ({"temperature": 0.9, "top_k": 40, "seed": 7}, ["--temperature", "0.9", "--top-k", "40", "--max-new-tokens", "12"]),
])
def test_input_file_equals_tools_generate(eval_checkpoint, tmp_path, capsys, keys, flags):
    cfg = text_generation_yml(tmp_path, eval_checkpoint, **keys)
    assert exit_code(load_script("generate.py"), [cfg]) == 0
    out = samples(tmp_path / "sample_output.txt")
    assert [s["context"] for s in out] == PROMPTS
    assert set(out[0]) == {"context", "text", "length", "finished", "message", "duration_seconds"}
    for i, sample in enumerate(out):
        seed = ["--seed", str(7 + i)] if keys else []
        assert sample["text"] + "\n" == tool_text(eval_checkpoint, sample["context"], flags + seed, capsys)
        assert sample["length"] == 12 or sample["finished"]
    if keys:  # seeded sampling really samples: another seed gives another text somewhere
        other = [tool_text(eval_checkpoint, p, flags + ["--seed", "1000"], capsys) for p in PROMPTS]
        assert other != [s["text"] + "\n" for s in out]


def test_unconditional_writes_num_samples_from_the_end_of_document_token(eval_checkpoint, tmp_path, capsys):
    cfg = text_generation_yml(tmp_path, eval_checkpoint, text_gen_type="unconditional", num_samples=3,
                              temperature=1.0, seed=3)
    assert exit_code(load_script("generate.py"), [cfg]) == 0
    out = samples(tmp_path / "sample_output.txt")
    assert len(out) == 3 and all(s["context"] == "" and 0 <= s["length"] <= 12 for s in out)
    assert len({s["text"] for s in out}) > 1  # sample i has seed + i


def test_the_model_comes_from_the_checkpoint_and_a_differing_yaml_key_is_noted(eval_checkpoint, tmp_path, capsys):
    cfg = text_generation_yml(tmp_path, eval_checkpoint, num_layers=5, hidden_size=32)
    assert exit_code(load_script("generate.py"), [cfg]) == 0
    err = capsys.readouterr().err
    assert "note: num_layers = 5 in the config differs from the checkpoint's 2; the checkpoint's model is used" in err
    assert "hidden_size" not in err
    assert len(samples(tmp_path / "sample_output.txt")) == len(PROMPTS)


def test_recompute_is_the_models_full_forward(eval_checkpoint, tmp_path, capsys):
    """recompute: true (no cache) equals streaming with a cache that keeps everything under the model's rule."""
    rule = dict(cache_policy="full", decode_mask="rule", pos_shift=False)
    a = text_generation_yml(tmp_path, eval_checkpoint, recompute=True, sample_output_file=str(tmp_path / "a.jsonl"))
    b = text_generation_yml(tmp_path, eval_checkpoint, sample_output_file=str(tmp_path / "b.jsonl"), **rule)
    generate = load_script("generate.py")
    assert exit_code(generate, [a]) == 0 and exit_code(generate, [b]) == 0
    texts = [s["text"] for s in samples(tmp_path / "a.jsonl")]
    assert texts == [s["text"] for s in samples(tmp_path / "b.jsonl")] and any(texts)


def test_interactive_reads_prompts_until_the_input_ends(eval_checkpoint, tmp_path, capsys, monkeypatch):
    cfg = text_generation_yml(tmp_path, eval_checkpoint)
    assert exit_code(load_script("generate.py"), [cfg]) == 0
    expected = [s["text"] for s in samples(tmp_path / "sample_output.txt")][:2]
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0] + "\n" + PROMPTS[1] + "\n"))
    interactive = text_generation_yml(tmp_path, eval_checkpoint, text_gen_type="interactive")
    assert exit_code(load_script("generate.py"), [interactive]) == 0
    out = capsys.readouterr().out
    assert [line.split("Generated Text: ", 1)[1] for line in out.splitlines() if "Generated Text: " in line] == expected


@pytest.mark.parametrize("keys, message", [
    ({"text_gen_type": None}, "error: text_gen_type is not set"),
    ({"sample_input_file": None}, "error: text_gen_type input-file needs sample_input_file"),
    ({"sample_input_file": "missing.txt"}, "error: sample_input_file 'missing.txt' not found"),
    ({"top_p": 1.5}, "top_p = 1.5; expected a probability in [0, 1] (0 = off)"),
    ({"text_gen_type": "precompute"}, "key 'text_gen_type' = 'precompute' is not valid"),
    ({"maximum_tokens": 0}, "maximum_tokens = 0; expected an integer >= 1"),
])
def test_bad_generation_settings_are_one_line(eval_checkpoint, tmp_path, capsys, keys, message):
    cfg = text_generation_yml(tmp_path, eval_checkpoint, **keys)
    assert exit_code(load_script("generate.py"), [cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
