"""Run launch/train.py, but rank 1's loss is NaN at the given optimizer steps (1-based):
usage: nan_at_steps.py 3,5 TRAIN_PY [args...]"""

import dataclasses
import os
import runpy
import sys

import plot_ds.training.loop as training

steps = {int(s) for s in sys.argv[1].split(",")}
original = training.train_step
calls = {"n": 0}


def train_step(run, micro_batches, before_update=None):
    calls["n"] += 1
    if calls["n"] in steps and os.environ.get("RANK") == "1":
        wrapped = run.objective

        class Poisoned:
            def __getattr__(self, name):  # needs, plot, ...: the objective's
                return getattr(wrapped, name)

            def __call__(self, *args):
                loss, metrics = wrapped(*args)
                return loss * float("nan"), metrics

        return original(dataclasses.replace(run, objective=Poisoned()), micro_batches, before_update)
    return original(run, micro_batches, before_update)


training.train_step = train_step
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
