"""plot_ds/compare/grid.py: variants, seeds and sweeps expand into validated, comparable runs; every
mistake is refused before anything trains, naming the variant and key."""

import pytest
import yaml

from conftest import REPO
from plot_ds.compare.grid import STANDARD_VARIANTS, build_grid, parse_sweep
from plot_ds.compare.runner import plan, run_directory
from plot_ds.config import ConfigError


def write_grid(tmp_path, **tree):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_the_standard_grid_is_the_papers_comparison_and_runs_seed_major():
    grid = build_grid(seeds=[1, 2])
    assert list(grid.variants) == ["dpo", "dpo+plot", "dpo+sft", "sft", "sft+plot"] == list(STANDARD_VARIANTS)
    runs = grid.runs()
    assert [r.name for r in runs[:5]] == [f"{v}/seed1" for v in STANDARD_VARIANTS]
    assert {r.overrides["train.seed"] for r in runs[5:]} == {2}
    configs = {r.variant: grid.config_of(r, "out") for r in runs[:5]}
    assert configs["dpo+sft"].objective.term_weights() == {"dpo": 1.0, "sft": 1.0}
    assert configs["dpo+sft"].plot.active is False and configs["dpo+plot"].plot.active is True
    assert configs["sft+plot"].reference.mode == "none" and configs["sft+plot"].objective.label == "sft"


def test_a_grid_file_with_a_base_config_overrides_and_sweeps(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 2.0e-6\n")
    path = write_grid(
        tmp_path,
        config="base.yaml",
        overrides={"train.max_steps": 7},
        seeds=[3],
        baseline="a",
        variants={"a": {"plot.enabled": False}, "b": {"plot.alpha": 0.5}},
        sweeps={"b": {"plot.alpha": [0.1, 3]}},
    )
    grid = build_grid(path, overrides={"data.eval_size": 12}, sweeps=["a:train.lr=1e-6"])
    assert list(grid.variants) == ["a", "b", "b[plot.alpha=0.1]", "b[plot.alpha=3]", "a[train.lr=1e-6]"]
    configs = {r.variant: grid.config_of(r, tmp_path / r.variant) for r in grid.runs()}
    assert configs["b[plot.alpha=3]"].plot.alpha == 3.0 and configs["b"].plot.alpha == 0.5
    assert configs["a"].train.lr == 2e-6 and configs["a[train.lr=1e-6]"].train.lr == 1e-6
    assert all(c.train.max_steps == 7 and c.data.eval_size == 12 and c.train.seed == 3 for c in configs.values())
    assert str(configs["a"].train.output_dir) == str(tmp_path / "a")


def test_parse_sweep():
    assert parse_sweep("plot.alpha=0.1,0.3,1") == ("*", {"plot.alpha": [0.1, 0.3, 1]})
    assert parse_sweep("dpo+plot:plot.target=onehot,ref_mix") == ("dpo+plot", {"plot.target": ["onehot", "ref_mix"]})
    with pytest.raises(ConfigError, match="expected"):
        parse_sweep("plot.alpha")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"only": ["dpo", "dpo+plto"]}, "unknown variant\\(s\\) dpo\\+plto"),
        ({"baseline": "ipo"}, "baseline 'ipo' is not a variant"),
        (
            {"overrides": {"plot.alpah": 1.0}},
            "variant 'dpo' \\(seed 1\\): unknown config key 'plot.alpah' \\(did you mean 'plot.alpha'",
        ),
        ({"sweeps": ["ipo:plot.alpha=1,2"]}, "sweep over 'ipo': no such variant"),
    ],
)
def test_mistakes_are_refused_naming_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_grid(**kwargs)


def test_a_variant_that_changes_the_data_or_steps_is_incomparable(tmp_path):
    path = write_grid(tmp_path, variants={"short": {"data.max_length": 200}, "long": {}})
    with pytest.raises(ConfigError, match="'long' and 'short' differ in data.max_length \\(256 vs 200\\)"):
        build_grid(path)
    path = write_grid(tmp_path, variants={"a": {}, "b": {"train.max_steps": 9}})
    with pytest.raises(ConfigError, match="differ in train.max_steps"):
        build_grid(path)
    with pytest.raises(ConfigError, match="variant 'b' \\(seed 1\\): objective.name"):
        build_grid(write_grid(tmp_path, variants={"a": {}, "b": {"objective.name": "dpoo"}}))
    with pytest.raises(ConfigError, match="unknown grid key\\(s\\) varients"):
        build_grid(write_grid(tmp_path, varients={}))


def test_a_run_directory_of_other_settings_is_refused_before_anything_trains(tmp_path):
    grid = build_grid(seeds=[1], only=["dpo", "sft"])
    first = plan(grid, tmp_path)
    directory = run_directory(tmp_path, grid.runs()[0])
    directory.mkdir(parents=True)
    (directory / "grid_run.yaml").write_text(first[1].config.to_yaml())
    plan(grid, tmp_path)  # the same settings: resumable
    changed = build_grid(seeds=[1], only=["dpo", "sft"], overrides={"train.lr": 3e-6})
    with pytest.raises(ConfigError, match="holds a run of other settings \\(train.lr: 1e-05 -> 3e-06\\)"):
        plan(changed, tmp_path)


def test_every_shipped_grid_builds():
    grids = sorted((REPO / "configs" / "grids").glob("*.yaml"))
    assert grids
    for path in grids:
        grid = build_grid(path)
        assert len(grid.runs()) == len(grid.variants) * len(grid.seeds) and grid.baseline in grid.variants


def test_a_run_saved_by_an_older_version_without_a_new_key_still_resumes():
    from plot_ds.compare.grid import differences
    from plot_ds.config import Config

    wanted = Config().to_dict()
    saved = Config().to_dict()
    del saved["eval"]["reward_model"]
    assert differences(saved, wanted) == []
    wanted["eval"]["reward_model"] = "rm/"
    assert differences(saved, wanted) == ["eval.reward_model: '(absent)' -> 'rm/'"]
