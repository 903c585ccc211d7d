"""Command lines as a GPT-NeoX user types them: no abbreviations, a misspelled flag named with the flag
meant, and deepy.py refusing a flag it does not know before it launches anything."""
import subprocess
import sys

import pytest
from conftest import ROOT, load_script

from megatron.cli import cli_parser

SCRIPTS = ["train.py", "eval.py", "deepy.py", "tools/preprocess_data.py", "tools/generate.py",
           "tools/ckpts/reshard.py", "tools/ckpts/convert_to_hf.py", "tools/ckpts/convert_from_hf.py",
           "tools/eval_streaming_ppl.py", "tools/inspect_dataset.py", "tools/train_tokenizer.py",
           "tools/datasets/build_eval_tasks.py", "tools/datasets/prepare_corpus.py", "tools/plot_runs.py",
           "tools/run_experiments.py", "tools/apply_gpu_report.py",]


def parse_fails(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_abbreviation_is_not_the_flag(capsys):
    p = cli_parser(prog="reshard.py")
    p.add_argument("--save", required=True)
    assert p.parse_args(["--save", "x"]).save == "x"
    assert parse_fails(p, ["--sav", "x"], capsys) == "reshard.py: error: unknown flag --sav; did you mean --save?"


def test_a_misspelled_required_flag_is_named_as_misspelled_not_missing(capsys):
    p = cli_parser(prog="tool")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--input", required=True)
    err = parse_fails(p, ["--input", "a", "--output_prefx", "b"], capsys)
    assert err == "tool: error: unknown flag --output_prefx; did you mean --output-prefix?"
    assert parse_fails(p, ["--input", "a", "--zzz=1"], capsys) == "tool: error: unknown flag --zzz"


def test_underscores_and_dashes_are_one_spelling_as_in_config_keys(capsys):
    p = cli_parser(prog="tool")
    p.add_argument("--output-prefix")
    p.add_argument("--input_dir")
    args = p.parse_args(["--output_prefix", "a", "--input-dir=b"])
    assert (args.output_prefix, args.input_dir) == ("a", "b")
    assert parse_fails(p, ["--Output_Prefix", "a"], capsys).endswith("did you mean --output-prefix?")


def test_argparse_errors_are_one_line(capsys):
    p = cli_parser(prog="tool")
    p.add_argument("--n", type=int, required=True)
    assert parse_fails(p, [], capsys) == "tool: error: the following arguments are required: --n (see tool --help)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_entry_point_builds_its_parser_from_the_factory(script):
    text = (ROOT / script).read_text()
    assert "argparse.ArgumentParser(" not in text, f"{script} builds its own parser"
    assert "cli_parser" in text or "import main" in text or "main(" in text


def load_deepy():
    return load_script("deepy.py")


@pytest.mark.parametrize("argv, message", [
    (["--dryrun", "train.py", "configs/tiny.yml"], "unknown flag --dryrun; did you mean --dry-run?"),
    (["train.py", "configs/tiny.yml", "--dryrun"], "unknown flag --dryrun; did you mean --dry-run?"),
    (["--num_gpu", "2", "train.py", "configs/tiny.yml"], "unknown flag --num_gpu; did you mean --num_gpus?"),
    (["eval.py", "configs/tiny.yml", "--eval_task", "x"], "unknown flag --eval_task; did you mean --eval_tasks?"),
    (["train.py", "configs/tiny.yml", "--seed", "3"], "unknown flag --seed"),
])
def test_deepy_refuses_unknown_flags_before_launching(argv, message, capsys, monkeypatch):
    deepy = load_deepy()
    started = []
    monkeypatch.setattr("megatron.launch.signals.start_local", lambda *a, **k: started.append(a))
    with pytest.raises(SystemExit) as info:
        deepy.main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"deepy.py: error: {message}"
    assert not started


def test_deepy_passes_script_flags_on_in_neox_dialect():
    """NeoX's README: ``deepy.py eval.py -d configs your_configs.yml --eval_tasks task1 task2``."""
    deepy = load_deepy()
    args = deepy.parse_args(["eval.py", "-d", "configs", "tiny.yml", "--eval_tasks", "lambada", "piqa",
                             "--task_data", "d", "--dry_run"])
    assert args.conf_dir == "configs" and args.configs == ["tiny.yml"] and args.dry_run
    assert args.script_args == ["--eval_tasks", "lambada", "piqa", "--task_data", "d"]


def test_deepy_finds_our_scripts_from_another_directory(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "--dry-run", "generate.py",
                          str(ROOT / "configs" / "tiny.yml")], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert "script not found" not in out.stderr
    assert str(ROOT / "generate.py") in out.stdout, out.stdout[-2000:] + out.stderr


@pytest.mark.parametrize("script, argv, message", [
    ("tools/generate.py", ["--load", "x", "--maximum_tokens", "5"],
     "unknown flag --maximum_tokens (GPT-NeoX's spelling); did you mean --max-new-tokens?"),
    ("tools/ckpts/reshard.py", ["--input_dir", "x"],
     "unknown flag --input_dir (GPT-NeoX's spelling); did you mean --load?"),
])
def test_a_neox_spelling_our_tool_spells_otherwise_names_ours(script, argv, message, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
