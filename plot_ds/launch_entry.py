"""A file to hand launchers that start a script (torchrun FILE, deepspeed FILE, mpirun python FILE,
srun --mpi=pmix python FILE): ``FILE train ARGS`` is plot-train, ``FILE compare-eval ARGS`` is plot-compare's
evaluation of one model. Imports are absolute: the file runs as a script, outside its package."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMANDS = {"train": "plot_ds.cli:train_main", "compare-eval": "plot_ds.compare.cli:evaluate_main"}

if __name__ == "__main__":
    # The deepspeed launcher puts --local_rank=N first; the rank also arrives in LOCAL_RANK.
    args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    if not args or args[0] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(COMMANDS)}}} ARGS")
    module, _, function = COMMANDS[args[0]].partition(":")
    main = getattr(__import__(module, fromlist=[function]), function)
    sys.exit(main(args[1:]))
