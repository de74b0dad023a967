"""Entry point: `deepspeed launch/train.py`, `torchrun ... launch/train.py` or `python launch/train.py`.

deepspeed --num_gpus 8 launch/train.py --config configs/my_run.yaml --train.lr 1e-6
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plot_ds.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
