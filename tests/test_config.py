import subprocess
import sys

import pytest
import yaml

from conftest import REPO, child_env
from plot_ds.config import Config, ConfigError, load_config, parse_overrides


def test_defaults_are_valid_and_describe_the_default_run():
    config = load_config()
    assert config.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert config.data.source == "builtin:champ"
    assert config.objective.name == "dpo"
    assert config.model.trust_remote_code is False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 2.0e-5\n  max_steps: 10\nobjective:\n  name: sft\n")
    config = load_config(path, parse_overrides(["--train.lr", "1e-6", "--train.adam_betas=[0.9, 0.99]"]))
    assert config.train.lr == 1e-6  # the command line wins
    assert config.train.max_steps == 10
    assert config.objective.name == "sft"
    assert config.train.adam_betas == (0.9, 0.99)


@pytest.mark.parametrize("args, message", [
    (["--train.lrr", "1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["--trian.lr", "1"], "unknown config key 'trian.lr' (did you mean 'train.lr'?)"),
    (["--train.lr", "fast"], "train.lr: expected a number, got 'fast'"),
    (["--train.max_steps", "1.5"], "train.max_steps: expected an integer, got 1.5"),
    (["--objective.name", "ppo"], "objective.name: 'ppo' is not one of 'sft', 'dpo'"),
    (["--model.trust_remote_code", "maybe"], "model.trust_remote_code: expected true or false"),
    (["--model.share_prompt", "maybe"], "model.share_prompt: expected true or false, got 'maybe'; "
                                        "or 'maybe' is not one of 'auto'"),
    (["--train.micro_batch_size", "0"], "train.micro_batch_size: must be >= 1"),
    (["--data.max_prompt_length", "400"], "data.max_prompt_length (400) must be smaller"),
    (["--train.lr"], "train.lr: missing value"),
    (["train.lr", "1"], "unexpected argument 'train.lr'"),
    (["--deepspeed.zero3_leaf_modules", "LlamaDecoderLayer;rm -rf"], "deepspeed.zero3_leaf_modules: "
     "'LlamaDecoderLayer;rm -rf' is not auto, none or a comma-separated list of module class names"),
])
def test_bad_values_name_the_key(args, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, parse_overrides(args))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_values_are_never_evaluated_as_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model:\n  name_or_path: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    config = load_config(None, parse_overrides(["--model.name_or_path", "__import__('os')"]))
    assert config.model.name_or_path == "__import__('os')"


def test_round_trip_through_saved_yaml(tmp_path):
    config = load_config(None, parse_overrides(["--train.lr", "3e-6", "--objective.beta", "0.2"]))
    config.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 3e-6


def test_cli_reports_a_bad_key_in_one_line_before_anything_heavy():
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--train.lrr", "1"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("plot-train: config error: unknown config key 'train.lrr' "
                                   "(did you mean 'train.lr'?)")
    assert "deepspeed" not in proc.stdout.lower()


def test_example_config_lists_every_key_with_its_default():
    path = REPO / "configs" / "example.yaml"
    assert load_config(path) == Config()
    listed = yaml.safe_load(path.read_text())
    assert {s: set(v) for s, v in listed.items()} == {s: set(v) for s, v in Config().to_dict().items()}
