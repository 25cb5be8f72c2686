"""Config files: unknown keys and bad values are errors that name the field."""

import pytest

from vidalign.config import ConfigError, config_digest, load_config
from vidalign_trainer.stage2 import Stage2Config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides(tmp_path):
    path = write(tmp_path, "student: tiny-videollava\ntrain:\n  steps: 7\n  lr: 2.0e-5\n")
    config = load_config(Stage2Config, path, ["train.batch_size=3", "teacher.address=127.0.0.1:1"])
    assert config.train.steps == 7 and config.train.lr == 2e-5 and config.train.batch_size == 3
    assert config.teacher.address == "127.0.0.1:1"
    assert config.train.text is True  # default kept


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.step\b.*known: .*train\.steps"):
        load_config(Stage2Config, write(tmp_path, "train:\n  step: 3\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many'"):
        load_config(Stage2Config, write(tmp_path, "train:\n  steps: many\n"))
    with pytest.raises(ConfigError, match=r"train\.text: expected true or false"):
        load_config(Stage2Config, None, ["train.text=maybe"])


def test_validation_errors_become_config_errors():
    with pytest.raises(ConfigError, match=r"train: .*timestep_range"):
        load_config(Stage2Config, None, ["train.timestep_range=[500, 100]"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Stage2Config, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Stage2Config, write(tmp_path, "train: [unclosed\n"))


def test_digest_changes_with_content():
    a = load_config(Stage2Config, None)
    b = load_config(Stage2Config, None, ["train.steps=41"])
    assert config_digest(a) == config_digest(load_config(Stage2Config, None))
    assert config_digest(a) != config_digest(b)


def test_teacher_wait_is_a_time_budget_and_retries_is_deprecated():
    assert load_config(Stage2Config, None).teacher.wait_s == 300
    assert load_config(Stage2Config, None, ["teacher.wait_s=60"]).teacher.wait_s == 60
    with pytest.raises(ConfigError, match=r"teacher\.wait_s must be >= 0"):
        load_config(Stage2Config, None, ["teacher.wait_s=-1"])
    # The old key still loads: wait_s becomes the time its backoff took (0.5 s doubling).
    assert load_config(Stage2Config, None, ["teacher.retries=5"]).teacher.wait_s == 15.5
    assert load_config(Stage2Config, None, ["teacher.retries=0"]).teacher.wait_s == 0
