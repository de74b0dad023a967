"""DeepSpeed engines: a destroyed ZeRO-3 engine lets its weights go."""
DESTROY_AND_CHECK = """
import gc, sys, weakref
import torch
from plot_ds.config import load_config
from plot_ds.distributed import init_distributed
from plot_ds.ds_config import load_ds_config
from plot_ds.engine import build_reference_engine, destroy_engine
from plot_ds.host_memory import release_freed_memory
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

    proc = run_command([sys.executable, "-c", DESTROY_AND_CHECK, tiny_model_dir, zero3_test_config],
                       timeout=300, MASTER_ADDR="127.0.0.1")
    plain_model, plain_weight, model, weight = proc.stdout.split("ALIVE")[-1].split()[:4]
    assert (model, weight) == ("False", "False"), f"outlived destroy_engine: model {model}, weights {weight}"
    assert plain_weight == "True"  # DeepSpeed's destroy() alone keeps them: what this guards against
