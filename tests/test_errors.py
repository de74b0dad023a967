"""The error policy (plot_ds/errors.py): every input mistake a user can make, run as the user runs
it (one process, and 2 real ranks under the deepspeed launcher and torchrun), ends in one message
with its key words, the documented exit status, and no traceback."""

import json
import re
import shutil
import sys
import time

import pytest

from conftest import REPO, child_env, free_port, run_command, start

from plot_ds import errors

TRAIN = str(REPO / "launch" / "train.py")
FAST = [
    "--train.max_steps",
    "1",
    "--data.eval_size",
    "2",
    "--data.max_length",
    "64",
    "--data.max_prompt_length",
    "32",
    "--eval.generations",
    "0",
    "--eval.answer_samples",
    "0",
    "--train.precision",
    "fp32",
]


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, real_model_dir, tmp_path_factory):
    """Real files with the mistakes users make: a data file with a bad record, a Gemma 2 model
    (no sdpa), a sequence-classification checkpoint, a tokenizer with neither pad nor EOS token."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("inputs")
    good = [
        json.dumps({"prompt": f"What is {i} + 2?", "chosen": str(i + 2), "rejected": str(i + 3)}) for i in range(12)
    ]
    (root / "good.jsonl").write_text("\n".join(good) + "\n")
    (root / "bad.jsonl").write_text(
        "\n".join(good[:6] + [json.dumps({"prompt": "Hi", "chosen": "", "rejected": "x"})] + good[6:]) + "\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    small = dict(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(head_dim=8, **small)).save_pretrained(root / "gemma2")
    LlamaForSequenceClassification(LlamaConfig(num_labels=1, **small)).save_pretrained(root / "classifier")
    for name in ("gemma2", "classifier"):
        tokenizer.save_pretrained(root / name)
    shutil.copytree(tiny_model_dir, root / "no_eos")
    settings = json.loads((root / "no_eos" / "tokenizer_config.json").read_text())
    settings.update(eos_token=None, pad_token=None)
    (root / "no_eos" / "tokenizer_config.json").write_text(json.dumps(settings))
    return {"root": root, "tiny": tiny_model_dir}


# (case, arguments, status, words the message must hold); {root} and {tiny} are filled in.
CASES = [
    (
        "unknown config key",
        ["--model.name_or_path", "{tiny}", "--data.source", "{root}/good.jsonl", "--train.lrr", "1"],
        2,
        ["config error", "train.lrr", "train.lr"],
    ),
    (
        "bad record, strict",
        ["--model.name_or_path", "{tiny}", "--data.source", "{root}/bad.jsonl", "--data.on_bad_record", "strict"],
        2,
        ["data error", "bad.jsonl:7", "chosen", "skip"],
    ),
    (
        "missing data file",
        ["--model.name_or_path", "{tiny}", "--data.source", "{root}/absent.jsonl"],
        2,
        ["data error", "absent.jsonl", "no such file or folder"],
    ),
    (
        "missing model folder",
        ["--model.name_or_path", "{root}/no_such_model", "--data.source", "{root}/good.jsonl"],
        2,
        ["model error", "no_such_model", "no such folder"],
    ),
    (
        "hub id offline",
        ["--model.name_or_path", "gpt2", "--data.source", "{root}/good.jsonl"],
        2,
        ["model error", "'gpt2'", "HF_HUB_OFFLINE", "hf download gpt2"],
    ),
    (
        "no causal-LM head",
        ["--model.name_or_path", "{root}/classifier", "--data.source", "{root}/good.jsonl"],
        2,
        ["model error", "LlamaForSequenceClassification", "not a causal language model"],
    ),
    (
        "tokenizer without pad or EOS",
        ["--model.name_or_path", "{root}/no_eos", "--data.source", "{root}/good.jsonl"],
        2,
        ["model error", "neither a pad nor an EOS token", "tokenizer_config.json"],
    ),
    (
        "attention the model lacks",
        [
            "--model.name_or_path",
            "{root}/gemma2",
            "--data.source",
            "{root}/good.jsonl",
            "--model.attn_implementation",
            "sdpa",
        ],
        2,
        ["model error", "Gemma2ForCausalLM does not support it", "auto", "eager"],
    ),
]


def fill(arguments, inputs):
    return [a.format(root=inputs["root"], tiny=inputs["tiny"]) for a in arguments]


def assert_one_clean_message(output: str, words: list[str]) -> None:
    assert output.count("plot-train: ") == 1, output[-4000:]
    message = output[output.index("plot-train: ") :]
    for word in words:
        assert word in message, (word, message)
    assert "Traceback" not in output, output[-4000:]


def test_one_process(inputs, tmp_path):
    """Every case as one plain process; the cases run side by side (each exits at its mistake, on
    one core), each checked on its own."""
    launches = {
        case: start(
            [
                sys.executable,
                TRAIN,
                *fill(arguments, inputs),
                *FAST,
                "--train.output_dir",
                str(tmp_path / f"run{index}"),
            ]
        )
        for index, (case, arguments, _, _) in enumerate(CASES)
    }
    finished = {case: launch.finish(timeout=300) for case, launch in launches.items()}
    for case, _, status, words in CASES:
        proc = finished[case]
        assert proc.returncode == status, (case, proc.stdout[-3000:] + proc.stderr[-3000:])
        assert_one_clean_message(proc.stderr, words)


@pytest.mark.distributed
@pytest.mark.parametrize("case,arguments,status,words", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_under_deepspeed(inputs, tmp_path, case, arguments, status, words):
    """Both ranks meet the mistake; the message appears once and the job ends with its status."""
    command = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        TRAIN,
        *fill(arguments, inputs),
        *FAST,
        "--train.output_dir",
        str(tmp_path / "run"),
    ]
    proc = run_command(command, check=False, timeout=300)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_one_clean_message(proc.stdout + proc.stderr, words)


@pytest.mark.distributed
def test_torchrun_reports_the_status_and_the_other_rank_leaves_promptly(inputs, tmp_path):
    """torchrun exits 1 for any failed worker and prints its own summary (with a traceback of the
    launcher itself); the worker's message is still the only one of ours, and the rank that did not
    fail is stopped within seconds of the error, not left in a collective."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        TRAIN,
        "--model.name_or_path",
        inputs["tiny"],
        "--data.source",
        str(inputs["root"] / "absent.jsonl"),
        *FAST,
        "--train.output_dir",
        str(tmp_path / "run"),
    ]
    proc = start(command, merge_output=True)
    seen_at, output = None, []
    for line in proc.stdout:
        output.append(line)
        if seen_at is None and "plot-train: data error" in line:
            seen_at = time.monotonic()
    proc.finish(timeout=120)
    exit_after = time.monotonic() - seen_at
    text = "".join(output)
    assert proc.returncode == 1 and "exitcode  : 2" in text, text[-3000:]
    assert text.count("plot-train: data error: ") == 1
    assert not re.search(r'File ".*plot_ds/', text), text[-3000:]  # no frame of ours
    assert exit_after < errors.QUIET_SECONDS, exit_after
    print(f"2-rank torchrun job exited {exit_after:.2f} s after the error message")


def test_a_rank_other_than_0_prints_with_its_rank_after_rank_0_had_the_chance(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(errors, "QUIET_SECONDS", 0.0)
    errors.report("plot-train", errors.ModelError("model.name_or_path 'x': no such folder"))
    assert capsys.readouterr().err == "[rank 1] plot-train: model error: model.name_or_path 'x': no such folder\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    @errors.user_errors("plot-train")
    def main():
        raise KeyError("a bug of ours")

    with pytest.raises(KeyError):
        main()


def test_auto_attention_picks_what_the_model_supports():
    import torch
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM

    from plot_ds.engine.models import attention_for

    assert attention_for("auto", LlamaForCausalLM, torch.float32, "cpu") == "sdpa"
    assert attention_for("auto", Gemma2ForCausalLM, torch.bfloat16, "cpu") == "eager"
    with pytest.raises(errors.ModelError, match="flash-attn package, a CUDA device"):
        attention_for("flash_attention_2", LlamaForCausalLM, torch.float32, "cpu")
    with pytest.raises(errors.ModelError, match="'sdpaa': not an attention implementation"):
        attention_for("sdpaa", LlamaForCausalLM, torch.float32, "cpu")


@pytest.mark.parametrize(
    "program,arguments,words",
    [
        (
            "plot-data",
            ["--model.name_or_path", "{tiny}", "--data.source", "{root}/absent.jsonl"],
            ["plot-data: data error: ", "absent.jsonl: no such file or folder"],
        ),
        (
            "plot-eval",
            ["{root}/no_such_model", "--data.source", "{root}/good.jsonl"],
            ["plot-eval: model error: ", "no such folder"],
        ),
        ("plot-export", ["{root}"], ["plot-export: checkpoint error: ", "holds no complete plot_ds checkpoint"]),
    ],
    ids=["plot-data", "plot-eval", "plot-export"],
)
def test_every_entry_point_follows_the_policy(inputs, tmp_path, program, arguments, words):
    main = {"plot-data": "data_main", "plot-eval": "eval_main", "plot-export": "export_main"}[program]
    proc = run_command(
        [
            sys.executable,
            "-c",
            f"import sys; from plot_ds.cli import {main}; sys.exit({main}())",
            *fill(arguments, inputs),
        ],
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count(words[0]) == 1 and words[1] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_rank_whose_peer_left_says_so_in_one_line(monkeypatch):
    """Without a launcher to stop it, the rank left waiting in a collective fails there: one line
    naming what happened, status 5, no traceback; the rank that left gave the reason."""
    from conftest import WORKERS

    env = child_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [start([sys.executable, str(WORKERS / "peer_leaves.py")], env={**env, "RANK": str(r)}) for r in (0, 1)]
    (_, err0), (_, err1) = ((done.stdout, done.stderr) for done in (rank.finish(timeout=120) for rank in ranks))
    assert ranks[0].returncode == errors.EXIT_WRITE and "plot-train: write error: writing /somewhere" in err0
    assert ranks[1].returncode == errors.EXIT_PEER_LOST, err1
    lines = [line for line in err1.splitlines() if line.strip()]
    assert lines[-1].startswith("[rank 1] plot-train: stopped: another rank left a collective this one was in (")
    assert "that rank's output says why" in lines[-1] and "Traceback" not in err1


def test_a_collective_failing_for_another_reason_is_a_bug(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")

    @errors.user_errors("plot-train")
    def main():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        main()
