"""GPT-NeoX's tool paths and flags, as its README writes them: tools/datasets/preprocess_data.py,
tools/ckpts/convert_neox_to_hf.py and NeoX's tokenizer types, over our one implementation."""
import json

import numpy as np
import pytest
from conftest import SAMPLE, TOKENIZER, load_script

from megatron.data import MMapIndexedDataset
from megatron.errors import DataError
from megatron.errors import run_cli as run_entry_point
from megatron.tokenizer import build_tokenizer


def run(path: str, argv, capsys):
    """(exit code, stderr) of a tool's entry point as its __main__ runs it."""
    module = load_script(path)
    main = (lambda a: module.main(a, neox=True)) if path == "tools/datasets/preprocess_data.py" else module.main
    with pytest.raises(SystemExit) as info:
        run_entry_point(main, argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture
def docs(tmp_path):
    lines = (SAMPLE / "corpus.jsonl").read_text().splitlines()[:20]
    rows = [dict(json.loads(line), title=f"title {i}") for i, line in enumerate(lines)]
    path = tmp_path / "mydataset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def documents(prefix) -> list:
    ds = MMapIndexedDataset(str(prefix))
    return [list(np.asarray(ds[i])) for i in range(len(ds))]


def test_neox_readme_preprocess_command_line(docs, tmp_path, capsys):
    """NeoX's README example, paths changed: --vocab (NeoX's own abbreviation), --dataset-impl mmap, --append-eod."""
    path, rows = docs
    code, _ = run("tools/datasets/preprocess_data.py", [
        "--input", str(path), "--output-prefix", str(tmp_path / "mydataset"), "--vocab", str(TOKENIZER),
        "--dataset-impl", "mmap", "--tokenizer-type", "HFTokenizer", "--append-eod"], capsys)
    assert code == 0
    tok = build_tokenizer("HFTokenizer", str(TOKENIZER))
    assert documents(tmp_path / "mydataset_text_document") == [tok.encode(r["text"]) + [tok.eod_id] for r in rows]


def test_neox_defaults_and_keys(docs, tmp_path, capsys):
    """NeoX appends no eod unless asked; --jsonl-keys writes one dataset per key; --num-docs is the progress total."""
    path, rows = docs
    code, err = run("tools/datasets/preprocess_data.py", [
        "--input", str(path), "--output-prefix", str(tmp_path / "d"), "--vocab-file", str(TOKENIZER),
        "--tokenizer-type", "HFTokenizer", "--jsonl-keys", "text", "title", "--num-docs", "20"], capsys)
    assert code == 0
    tok = build_tokenizer("HFTokenizer", str(TOKENIZER))
    assert documents(tmp_path / "d_text_document") == [tok.encode(r["text"]) for r in rows]
    assert documents(tmp_path / "d_title_document") == [tok.encode(r["title"]) for r in rows]
    assert "tokenizing: 20 docs / 20 docs (100%)" in err


@pytest.mark.parametrize("flags, message", [
    (["--dataset-impl", "lazy"], "error: --dataset-impl lazy: only mmap"),
    (["--tokenizer-type", "TiktokenTokenizer"], "error: --tokenizer-type TiktokenTokenizer is not implemented"),
    (["--tokenizer-type", "HFGPT2Tokenizer"], "error: tokenizer_type HFGPT2Tokenizer needs a vocab_file"),
    (["--num-docs", "0"], "error: --num-docs must be at least 1"),
])
def test_neox_flags_we_cannot_honour_are_one_line(docs, tmp_path, capsys, flags, message):
    argv = ["--input", str(docs[0]), "--output-prefix", str(tmp_path / "x"), "--tokenizer-type", "HFTokenizer"]
    code, err = run("tools/datasets/preprocess_data.py", argv + flags, capsys)
    assert code == 2 and err.strip().startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("x_*"))


def test_char_level_tokenizer_is_neox_bytes(docs, tmp_path, capsys):
    tok = build_tokenizer("CharLevelTokenizer", None)
    assert (tok.vocab_size, tok.eod_id) == (512, 0)
    assert tok.encode("aé\n") == [97, 0xC3, 0xA9, 10]
    assert tok.decode(tok.encode("naïve text.\n") + [0]) == "naïve text.\n"
    assert tok.separator_ids(["."], include_space_prefixed=False) == [ord(".")]
    path, rows = docs
    code, _ = run("tools/datasets/preprocess_data.py", ["--input", str(path), "--output-prefix", str(tmp_path / "c"),
                                                         "--tokenizer-type", "CharLevelTokenizer", "--append-eod"],
                  capsys)
    assert code == 0
    assert documents(tmp_path / "c_text_document")[0] == list(rows[0]["text"].encode()) + [0]


def test_hf_gpt2_tokenizer_from_local_files_adds_neox_padding(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Assert statements are a convenient way."] * 4,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    plain = build_tokenizer("HFTokenizer", str(tmp_path / "tokenizer.json"))
    assert plain.token_id("<|padding|>") is None
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        neox = build_tokenizer("HFGPT2Tokenizer", str(source))
        assert neox.vocab_size == plain.vocab_size + 1 and neox.token_id("<|padding|>") == plain.vocab_size
        assert neox.encode("Assert statements.") == plain.encode("Assert statements.")
    bundled = build_tokenizer("HFGPT2Tokenizer", str(TOKENIZER))  # has NeoX's <|padding|> already
    assert bundled.vocab_size == build_tokenizer("HFTokenizer", str(TOKENIZER)).vocab_size
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.json"):
        build_tokenizer("HFGPT2Tokenizer", str(tmp_path / "empty"))


def test_neox_tokenizer_types_are_config_values():
    from megatron.config import config_from_tree

    assert config_from_tree({"tokenizer_type": "CharLevelTokenizer"}).data.tokenizer_type == "CharLevelTokenizer"
    assert config_from_tree({"tokenizer_type": "HFGPT2Tokenizer"}).data.tokenizer_type == "HFGPT2Tokenizer"


def test_neox_readme_convert_command_line(eval_checkpoint, tmp_path, capsys):
    """``convert_neox_to_hf.py --input_dir .../global_stepN --config_file cfg --output_dir hf --precision
    --architecture neox`` writes the GPT-NeoX class with the tokenizer named by the config."""
    import yaml
    from eval_helpers import eval_model_tree

    cfg = tmp_path / "my_config.yml"
    cfg.write_text(yaml.safe_dump(eval_model_tree()))
    out = tmp_path / "hf"
    code, err = run("tools/ckpts/convert_neox_to_hf.py", [
        "--input_dir", str(eval_checkpoint / "global_step1"), "--config_file", str(cfg), "--output_dir", str(out),
        "--precision", "fp16", "--architecture", "neox"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["torch_dtype"] == "float16"
    assert (out / "tokenizer.json").read_bytes() == TOKENIZER.read_bytes()
    assert "exporting layers: 2 layers / 2 layers (100%)" in err  # the conversion's progress


@pytest.mark.parametrize("flags, message", [
    (["--architecture", "mistral"], "error: --architecture mistral is not implemented"),
    (["--pad-token-id", "3"], "error: --pad-token-id is not implemented"),
    (["--inputdir", "x"], "error: unknown flag --inputdir; did you mean --input_dir?"),
])
def test_convert_refusals_are_one_line(eval_checkpoint, tmp_path, capsys, flags, message):
    argv = ["--input_dir", str(eval_checkpoint), "--output_dir", str(tmp_path / "hf")]
    code, err = run("tools/ckpts/convert_neox_to_hf.py", argv + flags, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()


def test_config_file_that_is_not_the_checkpoints_model_is_refused(eval_checkpoint, tmp_path, capsys):
    import yaml
    from eval_helpers import eval_model_tree

    cfg = tmp_path / "other.yml"
    cfg.write_text(yaml.safe_dump(eval_model_tree(num_layers=3)))
    code, err = run("tools/ckpts/convert_neox_to_hf.py", ["--input_dir", str(eval_checkpoint), "--config_file",
                                                          str(cfg), "--output_dir", str(tmp_path / "hf")], capsys)
    assert code == 2 and "does not describe checkpoint" in err and "num_layers 3 vs 2" in err
