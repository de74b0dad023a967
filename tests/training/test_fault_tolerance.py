"""Runs that die, are preempted or hit non-finite steps lose nothing and resume exactly."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, WORKERS, run_args, run_command, start, torchrun_command

TRAIN = str(REPO / "launch" / "train.py")
pytestmark = pytest.mark.distributed


def torchrun_cmd(script, *args):
    return torchrun_command(2, script, *args)


def history(out):
    return json.loads((out / "train_history.json").read_text())


def pair_ids(out):
    return [[json.loads(line) for line in (out / f"pair_ids.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


def logged_steps(out) -> int:
    path = out / "train_history.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for(condition, launch, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        if launch.poll() is not None:
            raise AssertionError(f"the run ended early ({launch.returncode}):\n{launch.stdout.read()[-4000:]}")
        if time.time() > deadline:
            launch.finish(timeout=0)  # stops it with every rank's stacks printed
        time.sleep(0.2)


def assert_same_run(out, reference):
    got, want = history(out), history(reference)
    assert [h["step"] for h in got] == list(range(1, 9))
    for a, b in zip(got, want):
        for name in ("loss/total", "loss/vanilla", "loss/plot", "rewards/margins", "grad_norm", "lr"):
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (a["step"], name)
    assert pair_ids(out) == pair_ids(reference)
    for epoch in (0, 1):  # each of the 10 training pairs once per epoch
        seen = [i for rank in pair_ids(out) for r in rank if r["epoch"] == epoch for i in r["ids"]]
        assert len(seen) == len(set(seen)) == 10


def test_sigkill_mid_training_then_resume_is_exact(
    uninterrupted, tiny_model_dir, zero3_test_config, data_file, tmp_path
):
    out = tmp_path / "run"
    cmd = torchrun_cmd(TRAIN, *run_args(tiny_model_dir, zero3_test_config, out, "--data.source", data_file))
    proc = start(cmd, merge_output=True)
    wait_for(lambda: logged_steps(out) >= 5, proc)  # past the step-4 checkpoint
    proc.kill()
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000004"
    resumed = run_command(cmd)
    assert "resumed from" in resumed.stdout and "step_00000004 at step 4" in resumed.stdout
    assert_same_run(out, uninterrupted)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000006", "step_00000008"]  # keep_last 2


def test_lora_run_sigkilled_then_resumed_is_exact(tiny_model_dir, zero3_test_config, data_file, tmp_path):
    """Adapters with dropout on: the checkpoint holds the adapters, their optimizer state and the
    random streams (not the frozen base), and the resumed run is the uninterrupted one."""
    lora = ("--data.source", data_file, "--adapter.method", "lora", "--adapter.rank", "4", "--adapter.dropout", "0.1")
    full = tmp_path / "full"
    run_command(torchrun_cmd(TRAIN, *run_args(tiny_model_dir, zero3_test_config, full, *lora)))
    out = tmp_path / "run"
    cmd = torchrun_cmd(TRAIN, *run_args(tiny_model_dir, zero3_test_config, out, *lora))
    proc = start(cmd, merge_output=True)
    wait_for(lambda: logged_steps(out) >= 5, proc)
    proc.kill()
    resumed = run_command(cmd)
    assert "step_00000004 at step 4" in resumed.stdout
    assert_same_run(out, full)
    assert (out / "final_model" / "model.safetensors").is_file()
    assert (out / "final_model_adapter" / "adapter_model.safetensors").is_file()


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
    uninterrupted, tiny_model_dir, zero3_test_config, data_file, tmp_path
):
    """Two crashes in one run, each resumed from the checkpoint before: rank 1 dies after writing
    its DeepSpeed partitions of checkpoint 4 but before its RNG states (rank 0, which marks
    checkpoints complete, must not mark this one); then, resumed, rank 0 dies right before marking
    checkpoint 6 complete. The run resumed again ends as the uninterrupted one."""
    out = tmp_path / "run"
    args = run_args(tiny_model_dir, zero3_test_config, out, "--data.source", data_file)
    proc = run_command(torchrun_cmd(WORKERS / "rank_dies_while_writing.py", "4", "1", TRAIN, *args), check=False)
    assert proc.returncode != 0
    step_4 = out / "checkpoints" / "step_00000004"
    assert (step_4 / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()  # rank 1 was mid-write
    assert not (step_4 / "rng_rank1.safetensors").exists()
    assert not (step_4 / "plot_ds_complete.json").exists()
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000002"
    # The worker runs the trainer but makes rank 0 die after the step-6 files are written and
    # before that checkpoint is marked complete.
    proc = run_command(torchrun_cmd(WORKERS / "die_while_checkpointing.py", "6", TRAIN, *args), check=False)
    assert proc.returncode != 0 and "step_00000002 at step 2" in proc.stdout
    assert (out / "checkpoints" / "step_00000006").is_dir()
    assert not (out / "checkpoints" / "step_00000006" / "plot_ds_complete.json").exists()
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000004"
    resumed = run_command(torchrun_cmd(TRAIN, *args))
    assert "step_00000004 at step 4" in resumed.stdout
    assert_same_run(out, uninterrupted)


class RunsCodeWhenUnpickled:
    """What a tampered checkpoint file could hold: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_file_that_runs_code_when_unpickled_is_refused(uninterrupted, tmp_path):
    """Resume and plot-export read DeepSpeed's files with torch.load(weights_only=True): a file
    replaced by a pickle that runs a command is refused, naming it, and the command never runs."""
    import shutil

    import torch

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    marker = tmp_path / "the_payload_ran"
    tampered = out / "checkpoints" / "step_00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCodeWhenUnpickled(marker)}, tampered)
    # Whoever can replace a checkpoint file can rewrite its checksum too: the reader is the defence.
    rewrite_checksum(tampered)
    resumed = run_command(
        [
            sys.executable,
            TRAIN,
            "--config",
            str(out / "config.yaml"),
            "--train.max_steps",
            "9",
            "--train.gradient_accumulation_steps",
            "4",
            "--train.output_dir",
            str(out),
        ],
        check=False,
    )
    assert resumed.returncode != 0 and not marker.exists()
    assert f"{tampered}: not loadable as plain data (weights_only=True)" in resumed.stdout + resumed.stderr
    exported = run_command(
        [
            sys.executable,
            "-c",
            "import sys; from plot_ds.cli import export_main; sys.exit(export_main())",
            str(tampered.parent),
            "--output",
            str(tmp_path / "hf"),
        ],
        check=False,
    )
    assert exported.returncode != 0 and not marker.exists()
    assert "not loadable as plain data (weights_only=True)" in exported.stdout + exported.stderr


def rewrite_checksum(path) -> None:
    import hashlib

    marker = path.parent / "plot_ds_complete.json"
    info = json.loads(marker.read_text())
    info["files"][path.name] = [path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    marker.write_text(json.dumps(info))


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one byte flipped in the middle: same size, other content
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_file_is_named_with_what_is_wrong(how, uninterrupted, tmp_path):
    """``checkpointing.damage`` on a copy of a complete checkpoint with one shard damaged after it
    was marked complete: a truncated file by its size, a changed byte by its checksum."""
    import shutil

    from plot_ds.training.checkpointing import damage as find_damage

    copy = tmp_path / "step_00000008"
    shutil.copytree(uninterrupted / "checkpoints" / "step_00000008", copy)
    assert find_damage(copy) is None
    shard = copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damage(shard, how)
    expected = "truncated?" if how == "truncated" else "does not match its checksum"
    problem = find_damage(copy)
    assert problem.startswith(str(shard)) and expected in problem


def test_a_checkpoint_damaged_after_completion_is_skipped_by_auto_resume(
    uninterrupted, tiny_model_dir, zero3_test_config, data_file, tmp_path
):
    """A shard of the newest complete checkpoint has a byte changed after it was marked complete
    (only the rank whose stripe of checksums holds it can tell; the ranks agree): resume auto names
    the file, resumes from the previous checkpoint, and steps 7-8 equal the uninterrupted run's; an
    explicit train.resume of the damaged one is an error (exit 2). (A truncated file: the test above.)"""
    import shutil

    how = "flipped"
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shard = out / "checkpoints" / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damage(shard, how)
    args = run_args(tiny_model_dir, zero3_test_config, out, "--data.source", data_file)
    explicit = run_command(torchrun_cmd(TRAIN, *args, "--train.resume", shard.parent), check=False)
    text = explicit.stdout + explicit.stderr
    assert "exitcode  : 2" in text and text.count("plot-train: checkpoint error: train.resume: ") == 1, text[-3000:]
    assert f"{shard.parent} is damaged" in text and 'File "' + str(REPO / "plot_ds") not in text
    resumed = run_command(torchrun_cmd(TRAIN, *args))
    said = resumed.stdout + resumed.stderr
    assert f"checkpoint {shard.parent} is damaged: {shard}" in said, said[-3000:]
    assert "does not match its checksum" in said, said[-3000:]
    assert "step_00000006 at step 6" in resumed.stdout
    assert_same_run(out, uninterrupted)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size, mounted for real (root with CAP_SYS_ADMIN, as in CI here)."""
    mounted = []

    def mount(size_bytes: int):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root with CAP_SYS_ADMIN")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_while_checkpointing_loses_nothing(
    uninterrupted, tiny_model_dir, zero3_test_config, data_file, tmp_path, small_disk
):
    """Output on a disk with room for one checkpoint and a half: writing the second one fails. The
    run exits 4 naming the path and the free space, the partial checkpoint is gone, the first is
    still the newest complete one; moved to a larger disk, the run resumes and equals the
    uninterrupted one."""
    import shutil

    one = sum(f.stat().st_size for f in (uninterrupted / "checkpoints" / "step_00000008").rglob("*") if f.is_file())
    logs = sum(f.stat().st_size for f in uninterrupted.glob("*") if f.is_file())  # histories, configs
    disk = small_disk(int(1.5 * one) + logs + (1 << 20))
    out = disk / "run"
    args = run_args(
        tiny_model_dir, zero3_test_config, out, "--data.source", data_file, "--data.cache_dir", tmp_path / "cache"
    )
    full = run_command(torchrun_cmd(TRAIN, *args), check=False)
    text = full.stdout + full.stderr
    assert "exitcode  : 4" in text and text.count("plot-train: write error: writing checkpoint ") == 1, text[-3000:]
    assert f"{out / 'checkpoints' / 'step_00000004'} failed" in text and "GiB free on" in text
    assert "less than the previous checkpoint" in text  # warned before it tried
    assert 'File "' + str(REPO / "plot_ds") not in text
    assert not (out / "checkpoints" / "step_00000004").exists()
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000002"
    moved = tmp_path / "larger_disk" / "run"
    shutil.copytree(out, moved)
    resumed = run_command(
        torchrun_cmd(
            TRAIN,
            *run_args(
                tiny_model_dir,
                zero3_test_config,
                moved,
                "--data.source",
                data_file,
                "--data.cache_dir",
                tmp_path / "cache",
            ),
        )
    )
    assert "step_00000002 at step 2" in resumed.stdout
    assert_same_run(moved, uninterrupted)


def stop_with(signal_number, cmd, out, after_steps: int) -> int:
    """Start ``cmd``, send ``signal_number`` once ``after_steps`` steps are logged; the run must
    checkpoint and exit 75. Returns the checkpoint's step."""
    proc = start(cmd, merge_output=True)
    wait_for(lambda: logged_steps(out) >= after_steps, proc)
    proc.send_signal(signal_number)
    output = proc.finish(timeout=600).stdout
    assert proc.returncode == 75, output[-3000:]
    assert f"{signal.Signals(signal_number).name}: checkpoint" in output
    return int((out / "checkpoints" / "latest_complete").read_text().strip().split("_")[1])


def test_ctrl_c_checkpoints_and_exits_75_and_a_second_one_stops_at_once(
    tiny_model_dir, zero3_test_config, data_file, tmp_path
):
    # Steps of a few seconds (16 micro-batches of real 256-token pairs), so that the second Ctrl-C
    # lands while the step the first one asked to finish is still running.
    args = [
        "--data.source",
        "builtin:champ",
        "--train.save_every",
        "0",
        "--train.max_steps",
        "40",
        "--train.gradient_accumulation_steps",
        "16",
        "--data.max_length",
        "256",
        "--data.max_prompt_length",
        "128",
    ]
    first = tmp_path / "once"
    step = stop_with(
        signal.SIGINT,
        [sys.executable, TRAIN, *run_args(tiny_model_dir, zero3_test_config, first, *args)],
        first,
        after_steps=2,
    )
    assert 2 <= step < 40 and logged_steps(first) == step  # the step in flight finished, then it stopped

    twice = tmp_path / "twice"
    proc = start([sys.executable, TRAIN, *run_args(tiny_model_dir, zero3_test_config, twice, *args)], merge_output=True)
    wait_for(lambda: logged_steps(twice) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals before Python's handler runs would be handled as one
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    output = proc.finish(timeout=600).stdout
    assert time.time() - sent < 10, "the second Ctrl-C did not stop the run at once"
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT, 1), (proc.returncode, output[-3000:])
    assert not (twice / "checkpoints" / "latest_complete").exists()  # no checkpoint: it stopped at once


def test_random_streams_are_restored_on_resume_with_dropout_on(tiny_model_dir, zero3_test_config, data_file, tmp_path):
    """With attention dropout the losses depend on the random stream of every step: a SIGKILLed
    run resumed from its checkpoint matches an uninterrupted one only if the RNG states come back."""
    from conftest import make_tiny_llama

    import torch
    from transformers import AutoModelForCausalLM

    dropout = make_tiny_llama(tmp_path / "dropout_llama", tiny_model_dir, seed=0, attention_dropout=0.5)
    model = AutoModelForCausalLM.from_pretrained(dropout).train()
    ids = torch.arange(10, 40).unsqueeze(0)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
    args = ["--data.source", str(data_file), "--train.max_steps", "6", "--eval.generations", "0"]
    runs = {"full": tmp_path / "full"}
    run_command([sys.executable, TRAIN, *run_args(dropout, zero3_test_config, runs["full"], *args)])
    out = tmp_path / "killed"
    cmd = [sys.executable, TRAIN, *run_args(dropout, zero3_test_config, out, *args)]
    proc = start(cmd, merge_output=True)
    wait_for(lambda: logged_steps(out) >= 3, proc)  # past the step-2 checkpoint
    proc.kill()
    resumed = run_command(cmd)
    assert "at step" in resumed.stdout
    got, want = history(out), history(runs["full"])
    assert [h["step"] for h in got] == [h["step"] for h in want] == list(range(1, 7))
    for a, b in zip(got, want, strict=True):
        for name in ("loss/total", "grad_norm", "rewards/margins"):
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (a["step"], name)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes(
    uninterrupted, tiny_model_dir, zero3_test_config, data_file, tmp_path
):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        TRAIN,
        *run_args(tiny_model_dir, zero3_test_config, out, "--data.source", data_file, "--train.save_every", "0"),
    ]
    # One process holds the same global batch (micro 1 x accumulation 4) as 2 ranks x 2.
    cmd += ["--train.gradient_accumulation_steps", "4"]
    step = stop_with(signal.SIGTERM, cmd, out, after_steps=3)
    assert 3 <= step < 8
    resumed = run_command(cmd)
    assert f"at step {step}" in resumed.stdout
    got, want = history(out), history(uninterrupted)
    assert [h["step"] for h in got] == list(range(1, 9))
    for a, b in zip(got, want):  # one process vs two ranks: float tolerance
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-4), a["step"]


def merged_weights(checkpoint):
    """The fp32 weights merged from every rank's partitions of a checkpoint, as plot-export reads
    them (read here in one process: plot-export itself runs in the tests beside this one)."""
    from plot_ds.engine.deepspeed_patches import merged_fp32_state_dict

    return merged_fp32_state_dict(str(checkpoint.parent), tag=checkpoint.name)


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_model_dir, zero3_test_config, data_file, tmp_path):
    import torch

    out = tmp_path / "run"
    args = run_args(
        tiny_model_dir,
        zero3_test_config,
        out,
        "--data.source",
        data_file,
        "--train.save_every",
        "1",
        "--train.keep_last",
        "0",
        "--train.max_consecutive_faults",
        "2",
    )
    # Step 3, then steps 6 and 7, get a NaN loss on rank 1 only.
    proc = run_command(torchrun_cmd(WORKERS / "nan_at_steps.py", "3,6,7", TRAIN, *args), check=False)
    records = [json.loads(line) for line in (out / "train_history.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    assert by_step[2]["faults/skipped_steps"] == 0
    assert by_step[3]["faults/skipped_steps"] == 1 and not math.isfinite(by_step[3]["grad_norm"])
    assert by_step[4]["faults/skipped_steps"] == 1 and math.isfinite(by_step[4]["grad_norm"])  # going again
    assert max(by_step) == 7  # stopped after two consecutive faults (6, 7)
    # The documented exit status 3, on the ranks (torchrun itself then exits 1, reporting theirs).
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    assert "stopping: 2 consecutive non-finite steps (last 7)" in proc.stdout + proc.stderr
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000007"
    # A skipped update leaves every rank's partition of the weights as it was; the next one moves them.
    weights = {step: merged_weights(out / "checkpoints" / f"step_{step:08d}") for step in (2, 3, 4, 5, 7)}
    for before, after in ((2, 3), (5, 7)):
        assert weights[before].keys() == weights[after].keys()
        assert all(torch.equal(weights[before][k], weights[after][k]) for k in weights[before]), (before, after)
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])


def test_export_round_trip_with_tied_embeddings(tiny_model_dir, zero3_test_config, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    out.mkdir()
    run_command(torchrun_cmd(WORKERS / "export_roundtrip.py", tiny_model_dir, zero3_test_config, out))
    exported = run_command(
        [
            sys.executable,
            "-c",
            "import sys; from plot_ds.cli import export_main; sys.exit(export_main())",
            str(out),
            "--output",
            str(tmp_path / "from_checkpoint"),
        ],
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    engine = torch.load(out / "engine_logits.pt", weights_only=True)
    for folder in (out / "live_export", tmp_path / "from_checkpoint"):
        assert {p.name for p in folder.iterdir()} >= {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
        }
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert model.config.tie_word_embeddings
        assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
        with torch.no_grad():
            logits = model(input_ids=engine["input_ids"], attention_mask=engine["attention_mask"]).logits
        torch.testing.assert_close(logits, engine["logits"], rtol=1e-5, atol=1e-5)
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        before = untrained(input_ids=engine["input_ids"], attention_mask=engine["attention_mask"]).logits
    assert (before - engine["logits"]).abs().max() > 1e-3  # the export holds the trained weights


def test_resume_with_another_number_of_ranks_through_a_universal_checkpoint(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "checkpoints" / "step_00000008")  # the newest complete one is now step 6
    config = out / "config.yaml"
    # One rank now: the same global batch of 4 as micro 1 x accumulation 4.
    resumed = run_command(
        [
            sys.executable,
            TRAIN,
            "--config",
            str(config),
            "--train.gradient_accumulation_steps",
            "4",
            "--train.output_dir",
            str(out),
        ]
    )
    assert "step_00000006 at step 6" in resumed.stdout
    assert (out / "checkpoints" / "step_00000006.universal" / "plot_ds_complete.json").is_file()
    got, want = history(out), history(uninterrupted)
    assert [h["step"] for h in got] == list(range(1, 9))
    for a, b in zip(got[6:], want[6:], strict=True):  # every step after the resume
        for name in ("loss/total", "loss/vanilla", "loss/plot", "rewards/margins", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), (a["step"], name)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    # The one rank trains on the whole global batch of each step: both ranks' pairs, in order.
    one_rank = {r["step"]: r["ids"] for r in map(json.loads, (out / "pair_ids.rank0.jsonl").read_text().splitlines())}
    two_ranks = pair_ids(uninterrupted)
    for step in (7, 8):
        assert one_rank[step] == [i for rank in two_ranks for r in rank if r["step"] == step for i in r["ids"]]


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_one_rank_bf16_default_is_zero2_and_resumes_exactly(tiny_model_dir, data_file, tmp_path, adapter):
    """deepspeed.config auto on one rank with bf16 weights: ZeRO-2, recorded in the run's config;
    PLOT trains, a resumed run keeps ZeRO-2 and continues exactly, and the checkpoint exports; the
    same with LoRA adapters (whose checkpoints hold only the adapters)."""
    import yaml

    # A constant lr, so that a run cut short at step 4 and one of 6 steps share their schedule.
    args = [
        "--model.name_or_path",
        tiny_model_dir,
        "--data.source",
        data_file,
        "--objective.name",
        "dpo",
        "--data.max_length",
        "96",
        "--data.max_prompt_length",
        "48",
        "--data.eval_size",
        "0",
        "--train.precision",
        "bf16",
        "--train.micro_batch_size",
        "2",
        "--train.lr",
        "1e-3",
        "--train.warmup_steps",
        "0",
        "--train.min_lr_ratio",
        "1.0",
        "--train.save_every",
        "2",
        "--train.export_final",
        "false",
        "--eval.generations",
        "0",
        "--eval.answer_samples",
        "0",
        "--adapter.method",
        adapter,
    ]
    import shutil

    # One run of 6 steps; a copy without its checkpoints after step 4 resumes from there.
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_command([sys.executable, TRAIN, *args, "--train.max_steps", "6", "--train.output_dir", str(straight)])
    assert yaml.safe_load((straight / "config.yaml").read_text())["deepspeed"]["config"] == "ds_configs/zero2.json"
    ds = json.loads((straight / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    shutil.copytree(straight, cut)
    for later in ("step_00000006",):
        shutil.rmtree(cut / "checkpoints" / later)
    assert (cut / "checkpoints" / "step_00000004" / "plot_ds_complete.json").is_file()
    resumed = run_command([sys.executable, TRAIN, *args, "--train.max_steps", "6", "--train.output_dir", str(cut)])
    assert "step_00000004 at step 4" in resumed.stdout
    assert json.loads((cut / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    got, want = history(cut), history(straight)
    assert [h["step"] for h in got] == list(range(1, 7))
    for a, b in zip(got, want):
        for name in ("loss/total", "loss/plot", "plot/w_chosen", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-9), (a["step"], name)
    assert got[-1]["loss/plot"] > 0 and got[-1]["plot/slice_bytes"] == 0  # the whole matrix is here
    exported = run_command(
        [
            sys.executable,
            "-c",
            "import sys; from plot_ds.cli import export_main; sys.exit(export_main())",
            str(cut),
            "--output",
            str(tmp_path / "exported"),
        ]
    )
    assert exported.returncode == 0 and (tmp_path / "exported" / "model.safetensors").is_file()
    assert (tmp_path / "exported_adapter" / "adapter_model.safetensors").is_file() == (adapter == "lora")


def test_resume_into_sequence_parallelism_with_a_cached_reference(uninterrupted, tmp_path):
    """The 2-rank run (2 data-parallel ranks) resumed from step 6 as one sequence group of 2 ranks
    (parallel.sequence 2: each rank half of every row; the same global batch of 4 as micro 1 x
    accumulation 4), its reference log-probs now computed once by the group into a cache: steps 7
    and 8, the evaluation and the pairs trained on are the uninterrupted run's, and a generation
    (whole rows, Ulysses paused) is written."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    resumed = run_command(
        torchrun_cmd(
            TRAIN,
            "--config",
            str(out / "config.yaml"),
            "--parallel.sequence",
            "2",
            "--train.gradient_accumulation_steps",
            "4",
            "--reference.mode",
            "cache",
            "--reference.cache_path",
            str(tmp_path / "reference.safetensors"),
            "--eval.generations",
            "1",
            "--train.output_dir",
            str(out),
        )
    )
    assert "step_00000006 at step 6" in resumed.stdout
    assert "2 rank(s) in 1 sequence group(s) of 2" in resumed.stdout
    got, want = history(out), history(uninterrupted)
    assert [h["step"] for h in got] == list(range(1, 9))
    for a, b in zip(got[6:], want[6:], strict=True):
        for name in ("loss/total", "loss/vanilla", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), (a["step"], name)
    results, expected = (json.loads((run / "eval_results.json").read_text()) for run in (out, uninterrupted))
    for name in ("eval/loss/total", "eval/rewards/margins", "eval/logps/chosen"):
        assert results[name] == pytest.approx(expected[name], rel=1e-4), name
    assert len(results["generations"]) == 1 and results["generations"][0]["generation"]
    # Both ranks of the group trained on the step's whole global batch.
    ranks = pair_ids(out)
    for step in (7, 8):
        whole = [i for rank in pair_ids(uninterrupted) for r in rank if r["step"] == step for i in r["ids"]]
        assert [r["ids"] for r in ranks[0] if r["step"] == step] == [whole]
        assert [r["ids"] for r in ranks[1] if r["step"] == step] == [whole]
