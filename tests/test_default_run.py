"""The default run's pieces on the real model and data: SmolLM2-135M-Instruct, DPO, CHAMP pairs,
as one plain `python launch/train.py` process (shortened: 2 steps, shorter sequences)."""

import json
import math
import sys

import pytest

from conftest import REPO, run_command

pytestmark = pytest.mark.slow


def test_default_run_on_the_real_model(tmp_path, real_model_dir):
    out = tmp_path / "default"
    proc = run_command(
        [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--train.max_steps",
            "2",
            "--data.eval_size",
            "4",
            "--data.max_length",
            "160",
            "--data.max_prompt_length",
            "96",
            "--eval.max_new_tokens",
            "24",
            "--eval.answer_samples",
            "2",
            "--train.output_dir",
            str(out),
        ],
        timeout=1200,
        OMP_NUM_THREADS="2",
    )
    from plot_ds.config import load_config

    saved = load_config(out / "config.yaml")
    assert (saved.model.name_or_path, saved.data.source, saved.objective.label) == (
        "builtin:smollm2-135m-instruct",
        "builtin:champ",
        "dpo",
    )
    assert "440 training pairs" in proc.stdout + proc.stderr  # 444 real pairs, 4 held out
    history = json.loads((out / "train_history.json").read_text())
    assert history[0]["loss/vanilla"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    # With no rejected term, L_PLOT is the mean transport cost of the chosen tokens, in (0, 2).
    assert history[0]["loss/plot"] == pytest.approx(history[0]["plot/w_chosen"], rel=1e-6)
    assert 0 < history[0]["plot/w_chosen"] < 2
    # Real solutions: a trained instruct model already finds human text less likely than its own kind.
    assert history[0]["logps/chosen"] < 0 and history[0]["logps/rejected"] < 0
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert history[1]["grad_norm"] > 0
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert set(evaluated) >= {"eval/loss/total", "eval/rewards/accuracies", "eval/rewards/margins"}
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000002"
    assert any((out / "tensorboard").iterdir())
    assert len(evaluated["generations"]) == 2 and evaluated["eval/answer_samples"] == 2

    # plot-eval on the run: its exported final model against the run's starting model.
    proc = run_command(
        [
            sys.executable,
            "-c",
            "import sys; from plot_ds.cli import eval_main; sys.exit(eval_main())",
            str(out),
            "--eval.answer_samples",
            "4",
            "--eval.max_new_tokens",
            "48",
        ],
        timeout=1200,
        OMP_NUM_THREADS="2",
    )
    report = json.loads((out / "eval" / "final_model.json").read_text())
    assert report["model"] == str(out / "final_model") and report["held_out_pairs"] == 4
    assert report["metrics"]["eval/loss/vanilla"] == pytest.approx(evaluated["eval/loss/vanilla"], rel=1e-4)
    assert_answer_accuracy_is_the_scored_generations(report["metrics"], report["generations"], 4)
    assert all(g["generation"].strip() for g in report["generations"])  # the real model writes text
    assert "evaluation written to" in proc.stdout


def assert_answer_accuracy_is_the_scored_generations(metrics, generations, samples):
    """The accuracy is the share of scored generations whose extracted answer matches the reference,
    each judged as ``answer_matches`` judges it."""
    from plot_ds.data.answers import answer_matches

    scored = [g for g in generations if "reference_answer" in g]
    assert metrics["eval/answer_samples"] == samples == len(scored)
    assert all(g["correct"] == answer_matches(g["generation"], g["reference_answer"]) for g in scored)
    assert metrics["eval/answer_accuracy"] == pytest.approx(sum(g["correct"] for g in scored) / samples)
    assert metrics["eval/answer_extracted"] == pytest.approx(
        sum(g["extracted_answer"] is not None for g in scored) / samples
    )


def test_plot_run_on_the_real_model_lowers_the_transport_cost(tmp_path, real_model_dir):
    """PLOT alone (objective none: no SFT or DPO term, so nothing else can lower it) on 4 real
    CHAMP pairs, every step on the same pairs: W(chosen) must fall, through PLOT's own gradient."""
    from plot_ds.assets import champ_pairs
    from test_launch import scalars

    data = tmp_path / "four_pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in champ_pairs()[:4]))
    out = tmp_path / "plot"
    run_command(
        [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--objective.name",
            "none",
            "--data.source",
            str(data),
            "--data.eval_size",
            "0",
            "--data.max_length",
            "128",
            "--data.max_prompt_length",
            "64",
            "--train.gradient_accumulation_steps",
            "2",
            "--train.max_steps",
            "4",
            "--train.lr",
            "5e-5",
            "--train.warmup_steps",
            "0",
            "--train.save_checkpoint",
            "false",
            "--train.output_dir",
            str(out),
        ],
        timeout=1200,
        OMP_NUM_THREADS="2",
    )
    history = json.loads((out / "train_history.json").read_text())
    w = [h["plot/w_chosen"] for h in history]
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert all(h["loss/total"] == pytest.approx(h["loss/plot"], rel=1e-6) for h in history)  # PLOT is all
    assert w[-1] < w[0], w
    logged = scalars(out / "tensorboard")
    for name in ("loss/plot", "plot/w_chosen", "plot/w_rejected", "plot/slice_rows", "plot/slice_bytes"):
        assert name in logged, f"{name} missing from TensorBoard"
    assert logged["plot/w_chosen"] == pytest.approx(w, rel=1e-6)
