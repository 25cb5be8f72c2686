"""The `vidalign` command line: one grammar, discoverable defaults and config keys, a fast --help."""

from __future__ import annotations

import argparse
import dataclasses
import io
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vidalign.config import ConfigError, config_keys, format_config_keys, load_config
from vidalign_cli.main import ANSWERERS, BENCHMARKS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def vidalign(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidalign_cli.main", *args],
                          capture_output=True, text=True, timeout=timeout)


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every runnable command, e.g. (("train", "stage1"), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaf_parsers(child, (*path, name))


LEAVES = dict(leaf_parsers(build_parser()))
CONFIG_COMMANDS = [path for path, p in LEAVES.items() if p.get_default("config_class")]


def test_the_tree_has_every_command():
    assert {" ".join(p) for p in LEAVES} == {
        "teacher serve", "teacher info", "teacher gap", "train stage1", "train stage2",
        "train stage3", "train sft", "vda run", "features extract", "adapter init", "models list",
        "models pull", "data synth", "data prepare", "data shard", "priors extract", "priors show", "eval", "demo",
        "plan", "probe",
    }
    assert {" ".join(p) for p in CONFIG_COMMANDS} == {
        "train stage1", "train stage2", "train stage3", "train sft", "vda run", "features extract",
    }


def test_version_is_the_package_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = vidalign("--version", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"vidalign {version}"


def test_help_imports_no_torch():
    script = (
        "import sys\n"
        "from vidalign_cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'grpc')"
        " if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "teacher" in proc.stdout  # the help was printed
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


def _shown(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_every_option_shows_its_default(path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no wrapping inside a value
    parser = LEAVES[path]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        entry = " ".join(formatter._format_action(action).split())
        assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help"
        required = action.required or any(  # a renamed flag: required with its old spelling
            g.required and action in g._group_actions for g in parser._mutually_exclusive_groups
        )
        if required:
            assert "(required)" in entry, entry
        elif action.default in (None, False, [], ()):
            assert "(default" in entry, entry  # in words, e.g. (default: cuda if available)
        else:
            assert f"(default: {_shown(action.default)}" in entry, entry


def test_same_flag_same_meaning_everywhere():
    meaning = {"--teacher": "ADDRESS", "--teacher-model": "NAME", "--student": "NAME"}
    seen = set()
    for path, parser in LEAVES.items():
        for action in parser._actions:
            visible = action.help != argparse.SUPPRESS
            for flag in action.option_strings:
                if visible:
                    assert flag not in ("--model", "--address", "--to"), (path, flag)
                if flag in meaning and visible:
                    seen.add(flag)
                    assert action.metavar == meaning[flag], (path, flag, action.metavar)
    assert seen == set(meaning)


def test_old_spellings_still_parse_hidden_and_warn():
    parser = build_parser()
    cases = [
        (["teacher", "serve", "--model", "m"], ["teacher", "serve", "--teacher-model", "m"],
         "teacher_model"),
        (["teacher", "info", "--address", "h:1"], ["teacher", "info", "--teacher", "h:1"], "teacher"),
        (["teacher", "gap", "--model", "m"], ["teacher", "gap", "--teacher-model", "m"],
         "teacher_model"),
        (["models", "pull", "x", "--to", "s3://b/x"], ["models", "pull", "x", "--out", "s3://b/x"],
         "out"),
        (["eval", "--bench", "motionbench", "--data", "d", "--model", "s"],
         ["eval", "--bench", "motionbench", "--data", "d", "--student", "s"], "student"),
        (["priors", "extract", "--data", "d", "--out", "o", "--model", "m"],
         ["priors", "extract", "--data", "d", "--out", "o", "--teacher-model", "m"], "teacher_model"),
    ]
    for old, new, dest in cases:
        err = io.StringIO()
        with redirect_stderr(err):
            parsed = parser.parse_args(old)
        assert vars(parsed) == vars(parser.parse_args(new)), old
        assert "deprecated" in err.getvalue() and new[-2] in err.getvalue(), err.getvalue()
        assert getattr(parsed, dest) == new[-1]
    with pytest.raises(SystemExit), redirect_stderr(io.StringIO()):  # both spellings at once
        parser.parse_args(["teacher", "serve", "--model", "a", "--teacher-model", "b"])
    with pytest.raises(SystemExit), redirect_stderr(io.StringIO()):  # still required
        parser.parse_args(["teacher", "info"])
    assert "--address" not in LEAVES[("teacher", "info")].format_help()
    assert "--model" not in LEAVES[("teacher", "serve")].format_help()


def test_parser_choices_match_the_libraries():
    from vidalign.data.benchmarks import QA_BENCHMARKS
    from vidalign.eval import BASELINES

    assert set(BENCHMARKS) == set(QA_BENCHMARKS)
    assert set(ANSWERERS) == set(BASELINES)


def test_eval_needs_something_to_score(tmp_path):
    proc = vidalign("eval", "--bench", "motionbench", "--data", str(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("vidalign: error: eval: nothing to score")
    for flag in ("--student", "--predictions", "--answerer"):
        assert flag in line
    both = vidalign("eval", "--bench", "motionbench", "--data", str(tmp_path),
                    "--answerer", "oracle", "--predictions", "p.jsonl", timeout=120)
    assert both.returncode == 2 and "--predictions and --answerer" in both.stderr


def test_models_list_has_every_teacher_and_student(capsys):
    from vidalign.motionenhancer import COGVIDEOX_MODELS
    from vidalign.students import STUDENT_MODELS
    from vidalign.vda import TEACHER_MODELS

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    teachers, students = out.split("students (")
    listed = lambda text: {line.split()[0] for line in text.splitlines() if line.startswith("  ")}  # noqa: E731
    assert {"cogvideox-5b", "cogvideox1.5-5b", "tiny-cogvideox"} <= listed(teachers)
    assert listed(teachers) == set(TEACHER_MODELS) | set(COGVIDEOX_MODELS)
    assert listed(students) == set(STUDENT_MODELS)


# --- config-driven commands ------------------------------------------------------------


@dataclass(kw_only=True)
class _Section:
    width: int = 3
    """How wide."""
    tags: list[str] = field(default_factory=lambda: ["a", "b"])


@dataclass(kw_only=True)
class _Base:
    name: str = "base"
    """Inherited field's doc."""


@dataclass(kw_only=True)
class _Job(_Base):
    encoder: str = "enc"
    """An encoder URI; empty: none."""
    lora: str | None = "l"
    """A LoRA, or null."""
    steps: int = 10
    section: _Section = field(default_factory=lambda: _Section(width=7))
    """Not listed itself: its keys are."""
    extra: _Section | None = None
    required_uri: str


def test_config_keys_have_type_default_and_doc():
    keys = {k.key: k for k in config_keys(_Job)}
    assert list(keys) == ["name", "encoder", "lora", "steps", "section.width", "section.tags",
                          "extra", "extra.width", "extra.tags", "required_uri"]
    assert (keys["name"].type, keys["name"].default, keys["name"].doc) == (
        "str", "base", "Inherited field's doc.")
    assert (keys["lora"].type, keys["lora"].default) == ("str | None", "l")
    assert keys["section.width"].default == "7"  # the field's default_factory, not _Section's
    assert keys["extra.width"].default == "3" and keys["extra"].default == "null"
    assert keys["section.tags"].type == "list[str]" and keys["section.tags"].default == "[a, b]"
    assert keys["encoder"].doc == "An encoder URI; empty: none." and keys["steps"].doc == ""
    assert keys["required_uri"].default == "(required)"


def test_set_with_an_empty_value_is_the_empty_string():
    config = load_config(_Job, None, ["encoder=", "lora=", "required_uri=x"])
    assert config.encoder == "" and config.lora == ""
    assert load_config(_Job, None, ["lora=null", "required_uri=x"]).lora is None
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_config(_Job, None, ["steps=", "required_uri=x"])


@pytest.mark.parametrize("path", CONFIG_COMMANDS, ids=" ".join)
def test_config_help_lists_every_key(path):
    parser = LEAVES[path]
    help_text = parser.format_help()
    for flag in ("--config", "--set", "--print-config"):
        assert flag in help_text
    assert ("--resume" in help_text) == (path[0] == "train")
    config_class = parser.get_default("config_class")
    from vidalign.config import resolve_config_class

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from walk(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    listed = format_config_keys(config_class)
    assert listed in help_text
    for key in walk(resolve_config_class(config_class)):
        assert f"\n  {key}: " in help_text, (path, key)


def test_stage2_help_shows_a_key_with_type_default_and_doc():
    help_text = " ".join(LEAVES[("train", "stage2")].format_help().split())
    assert "train.lr: float = 1.0e-05 AdamW learning rate" in help_text
    assert "teacher.address: str = local" in help_text


@pytest.mark.parametrize("command, config_file, sets, cls", [
    (["train", "stage2"], "configs/stage2-tiny.yaml", ["train.steps=7", "teacher.adapter="],
     "vidalign_trainer.stage2:Stage2Config"),
    (["vda", "run"], "configs/vda/tiny-videollava.yaml", ["store=runs/x", "stage2.train.steps=3"],
     "vidalign_trainer.vda:VDAConfig"),
    (["features", "extract"], "configs/features-tiny.yaml", ["batch_size=3"],
     "vidalign_trainer.features:FeaturesConfig"),
])
def test_print_config_round_trips(command, config_file, sets, cls, tmp_path, capsys):
    from vidalign.config import resolve_config_class

    argv = [*command, "--config", str(ROOT / config_file)]
    for item in sets:
        argv += ["--set", item]
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--print-config"])
    assert exit.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    kind = resolve_config_class(cls)
    expected = load_config(kind, ROOT / config_file, sets)
    assert load_config(kind, printed) == expected
    assert load_config(kind, printed) != load_config(kind, None)  # the file and --set are in it


def test_a_bad_config_key_is_one_line_and_status_2(capsys):
    assert main(["train", "stage2", "--set", "train.stepz=3", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vidalign: error: unknown config key(s) train.stepz")
