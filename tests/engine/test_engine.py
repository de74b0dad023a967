"""DeepSpeed engines: loaded partitioned, and a destroyed ZeRO-3 engine lets its weights go."""

import pytest
import torch

DESTROY_AND_CHECK = """
import gc, sys, weakref
import torch
from plot_ds.config import load_config
from plot_ds.distributed.process_group import init_distributed
from plot_ds.engine.ds_config import load_ds_config
from plot_ds.engine.engines import build_reference_engine, destroy_engine
from plot_ds.training.host_memory import release_freed_memory
config = load_config(None, {"model.name_or_path": sys.argv[1], "deepspeed.config": sys.argv[2]})
init_distributed()
ds_config = load_ds_config(config, 1)

def pass_with_engine(destroy):
    engine, _ = build_reference_engine(config, ds_config)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        for _ in range(2):  # the second pass runs on the recorded trace, with the cached release plans
            engine(input_ids=ids, attention_mask=torch.ones_like(ids))
    model, weight = weakref.ref(engine.module), weakref.ref(engine.module.get_input_embeddings().weight)
    destroy(engine)
    return model, weight

plain = pass_with_engine(lambda engine: engine.destroy())
release_freed_memory()
ours = pass_with_engine(destroy_engine)
release_freed_memory()
print("ALIVE", " ".join(str(ref() is not None) for ref in (*plain, *ours)))
"""


def test_destroyed_zero3_engine_lets_its_model_go(tiny_model_dir, zero3_test_config):
    """DeepSpeed 0.19's engine.destroy() leaves the model on ZeRO-3's module stack and its coordinator
    (with every parameter) in a method cache, alive for the whole run; destroy_engine frees both, as
    the reference cache pass needs."""
    import sys

    from conftest import run_command

    proc = run_command(
        [sys.executable, "-c", DESTROY_AND_CHECK, tiny_model_dir, zero3_test_config],
        timeout=300,
        MASTER_ADDR="127.0.0.1",
    )
    plain_model, plain_weight, model, weight = proc.stdout.split("ALIVE")[-1].split()[:4]
    assert (model, weight) == ("False", "False"), f"outlived destroy_engine: model {model}, weights {weight}"
    assert plain_weight == "True"  # DeepSpeed's destroy() alone keeps them: what this guards against


@pytest.mark.distributed
def test_zero3_loads_policy_and_reference_partitioned_with_no_full_copy_on_any_rank(
    tiny_model_dir, zero3_test_config, tmp_path
):
    """A 140 MB model (many mid-sized tensors, none above 4 MB) loaded on 2 ranks: each rank's
    anonymous memory rises by about its half while the policy's model loads and while the frozen
    reference engine is built, never by a full copy; and each holds half of the elements."""
    import json

    import sys

    from conftest import WORKERS, free_port, run_command
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "llama_140mb"
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=2048,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=True,
        )
    ).save_pretrained(model_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    # glibc would otherwise keep freed mid-sized blocks resident (its mmap threshold rises as they are
    # freed), which would count freed memory as held: every block of 64 kB or more is mmapped here.
    run_command(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(WORKERS / "load_memory.py"),
            str(model_dir),
            zero3_test_config,
            str(tmp_path / "memory"),
        ],
        output=tmp_path / "memory.rank0",
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
    )
    ranks = [json.loads((tmp_path / f"memory.rank{r}").read_text()) for r in (0, 1)]
    model_bytes = ranks[0]["model_elements"] * 4
    assert model_bytes > 130e6
    for rank in ranks:
        assert rank["policy_elements"] == rank["reference_elements"]
        assert 0.49 * ranks[0]["model_elements"] < rank["policy_elements"] < 0.51 * ranks[0]["model_elements"]
        for load in ("policy_rise", "reference_rise"):
            # Half the model plus transients of one tensor at a time; a full copy would be 1.0 or more.
            assert rank[load] < 0.75 * model_bytes, (rank["rank"], load, rank[load] / model_bytes)


COUNT_LAYER_FORWARDS = """
import sys
from plot_ds.config import load_config
from plot_ds.training.run import setup_run
from plot_ds.training.loop import train_step
for setting in sys.argv[3].split(","):
    config = load_config(None, {"model.name_or_path": sys.argv[1], "deepspeed.config": sys.argv[2],
                                "plot.enabled": False, "objective.name": "sft",
                                "model.gradient_checkpointing": setting == "on", "data.max_length": 64,
                                "data.max_prompt_length": 32, "data.eval_size": 0, "train.resume": "none",
                                "train.micro_batch_size": 1})
    run = setup_run(config)
    calls = []
    for layer in run.policy.module.model.layers:  # transformers checkpoints forward(): its submodules rerun
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    train_step(run, run.micro_batches(0))
    print("CHECKPOINTING", setting, "TRAINING", run.policy.module.training, "FORWARDS", len(calls))
    run.policy.destroy()
"""


def test_the_policy_trains_in_training_mode_and_gradient_checkpointing_recomputes(tiny_model_dir, zero3_test_config):
    """from_pretrained hands back a model in eval mode, where dropout is off and transformers skips
    gradient checkpointing: the policy engine must be in training mode, and with
    model.gradient_checkpointing each decoder layer's forward runs again in the backward. Both
    settings in one process, one engine after the other."""
    import sys

    from conftest import run_command

    proc = run_command(
        [sys.executable, "-c", COUNT_LAYER_FORWARDS, tiny_model_dir, zero3_test_config, "off,on"],
        timeout=300,
        MASTER_ADDR="127.0.0.1",
    )
    seen = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CHECKPOINTING "):
            _, setting, _, training, _, forwards = line.split()
            seen[setting] = (training, int(forwards))
    layers = 2
    # Off: one rank of ZeRO-3 shares the prompt, three passes; on: one pass of full rows, recomputed.
    assert seen == {"off": ("True", layers * 3), "on": ("True", layers * 2)}, proc.stdout[-3000:]
