import re
import sys

import pytest
import yaml

from conftest import REPO, run_command
from plot_ds.config import Config, ConfigError, load_config, parse_overrides


def test_defaults_are_valid_and_describe_the_default_run():
    config = load_config()
    assert config.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert config.data.source == "builtin:champ"
    assert config.objective.term_weights() == {"dpo": 1.0} and config.objective.label == "dpo"
    assert config.model.trust_remote_code is False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 2.0e-5\n  max_steps: 10\nobjective:\n  name: sft\n")
    config = load_config(path, parse_overrides(["--train.lr", "1e-6", "--train.adam_betas=[0.9, 0.99]"]))
    assert config.train.lr == 1e-6  # the command line wins
    assert config.train.max_steps == 10
    assert config.objective.name == "sft"
    assert config.train.adam_betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.lrr", "1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["--trian.lr", "1"], "unknown config key 'trian.lr' (did you mean 'train.lr'?)"),
        (["--train.lr", "fast"], "train.lr: expected a number, got 'fast'"),
        (["--train.max_steps", "1.5"], "train.max_steps: expected an integer, got 1.5"),
        (["--objective.name", "ppo"], "objective.name: 'ppo' is not one of 'sft', 'dpo'"),
        (["--model.trust_remote_code", "maybe"], "model.trust_remote_code: expected true or false"),
        (
            ["--model.share_prompt", "maybe"],
            "model.share_prompt: expected true or false, got 'maybe'; or 'maybe' is not one of 'auto'",
        ),
        (["--train.micro_batch_size", "0"], "train.micro_batch_size: must be >= 1"),
        (["--data.max_prompt_length", "400"], "data.max_prompt_length (400) must be smaller"),
        (["--train.lr"], "train.lr: missing value"),
        (["train.lr", "1"], "unexpected argument 'train.lr'"),
        (
            ["--deepspeed.zero3_leaf_modules", "LlamaDecoderLayer;rm -rf"],
            "deepspeed.zero3_leaf_modules: "
            "'LlamaDecoderLayer;rm -rf' is not auto, none or a comma-separated list of module class names",
        ),
    ],
)
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
    proc = run_command(
        [sys.executable, str(REPO / "launch" / "train.py"), "--train.lrr", "1"], check=False, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "plot-train: config error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"
    )
    assert "deepspeed" not in proc.stdout.lower()


def test_example_config_lists_every_key_with_its_default():
    path = REPO / "configs" / "example.yaml"
    assert load_config(path) == Config()
    listed = yaml.safe_load(path.read_text())
    assert {s: set(v) for s, v in listed.items()} == {s: set(v) for s, v in Config().to_dict().items()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objective.terms", "{dpo: 1.0, ppo: 0.2}"], "objective.terms: unknown term 'ppo' (known: sft, dpo,"),
        (["--objective.terms", "{dpo: 1.0, sft: -0.2}"], "objective.terms.sft: the weight must be > 0"),
        (
            ["--objective.terms", "{dpo: 1.0}", "--objective.name", "sft"],
            "objective.name (sft) and objective.terms are both set",
        ),
        (["--objective.terms", "dpo"], "objective.terms: expected a mapping"),
        (["--objective.terms", "{}"], "objective.terms: empty"),
        (["--objective.name", "aot", "--reference.mode", "none"], "reference.mode: none, but the objective's aot term"),
        (["--objective.terms", "{simpo: 1, ipo: 0.5}", "--reference.mode", "none"], "objective's ipo term(s) need"),
    ],
)
def test_bad_objective_terms_are_one_line_errors_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, parse_overrides(args))


def test_weighted_terms_from_yaml_and_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  terms:\n    dpo: 1.0\n    sft: 0.2\n")
    config = load_config(path)
    assert config.objective.term_weights() == {"dpo": 1.0, "sft": 0.2} and config.objective.label == "1*dpo+0.2*sft"
    assert config.objective.needs_reference
    assert not load_config(
        None, parse_overrides(["--objective.terms", "{pro: 1, sft: 0.5}", "--reference.mode", "none"])
    ).objective.needs_reference
    saved = tmp_path / "saved.yaml"
    config.save(saved)
    assert load_config(saved).objective.term_weights() == {"dpo": 1.0, "sft": 0.2}  # a run's config reloads


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    if path.stem != "example":
        assert config.plot.active == path.stem.endswith("_plot")
        assert config.objective.label == {"rpo": "1*dpo+0.2*sft", "sft_plot": "sft", "dpo_plot": "dpo"}.get(
            path.stem, path.stem
        )
