"""Run launch/train.py, but rank RANK dies (os._exit) while writing checkpoint STEP: after
DeepSpeed's files, before its RNG files and the barrier, so rank 0 could only mark the checkpoint
complete by not waiting for it. usage: rank_dies_while_writing.py STEP RANK TRAIN_PY [args...]"""

import os
import runpy
import sys

import plot_ds.training.checkpointing as checkpointing
import plot_ds.training.loop as training

step, rank = int(sys.argv[1]), sys.argv[2]
writing = {"step": None}
original_save, original_rng_state = training.save_checkpoint, checkpointing.rng_state


def save_checkpoint(engine, output_dir, at_step, *args, **kwargs):
    writing["step"] = at_step
    return original_save(engine, output_dir, at_step, *args, **kwargs)


def rng_state():
    if writing["step"] == step and os.environ.get("RANK") == rank:
        os._exit(137)
    return original_rng_state()


training.save_checkpoint, checkpointing.rng_state = save_checkpoint, rng_state
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
