import json
import sys

import pytest

from conftest import REPO, free_port, run_command
from plot_ds.data import eval_shards


def test_eval_shards_give_every_rank_the_same_number_of_batches():
    shards = [eval_shards(7, 2, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {2}
    assert sorted(i for s in shards for batch in s for i in batch) == list(range(7))
    assert shards[2][1] == []  # a filler batch on the rank with fewest pairs


@pytest.mark.distributed
def test_generations_export_and_plot_eval_agree(tiny_model_dir, zero3_test_config, tmp_path):
    from test_launch import tiny_run_args
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_command(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(REPO / "launch" / "train.py"),
            *tiny_run_args(
                tiny_model_dir,
                zero3_test_config,
                out,
                "--train.max_steps",
                "2",
                "--train.lr",
                "1e-3",
                "--eval.max_new_tokens",
                "8",
                "--eval.generations",
                "3",
                "--eval.answer_samples",
                "5",
            ),
        ]
    )
    trained = json.loads((out / "eval_results.json").read_text())
    assert len(trained["generations"]) == 5  # 3 shown (all with CHAMP answers) + 2 more scored
    from test_default_run import assert_answer_accuracy_is_the_scored_generations

    assert_answer_accuracy_is_the_scored_generations(trained, trained["generations"], 5)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "eval/generations/text_summary" in events.Tags()["tensors"]

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "final_model")
    assert exported.get_input_embeddings().weight.data_ptr() == exported.get_output_embeddings().weight.data_ptr()
    # The exported weights reproduce the trained engine's held-out metrics and generations exactly.
    run_command(
        [
            sys.executable,
            "-c",
            "import sys; from plot_ds.cli import eval_main; sys.exit(eval_main())",
            str(out),
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for name in ("eval/loss/total", "eval/loss/plot", "eval/rewards/margins", "eval/logps/chosen"):
        assert evaluated["metrics"][name] == pytest.approx(trained[name], rel=1e-4, abs=1e-6), name
    assert [g["generation"] for g in evaluated["generations"]] == [g["generation"] for g in trained["generations"]]
