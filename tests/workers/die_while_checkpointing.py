"""Run launch/train.py, but rank 0 dies (os._exit) right before marking checkpoint STEP complete:
a crash in the middle of writing it. usage: die_while_checkpointing.py STEP TRAIN_PY [args...]"""

import os
import runpy
import sys

import plot_ds.training.checkpointing as checkpointing

step = int(sys.argv[1])
original = checkpointing._mark_complete


def mark_complete(directory, info):
    if info["step"] == step:
        os._exit(137)
    original(directory, info)


checkpointing._mark_complete = mark_complete
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
