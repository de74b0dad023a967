"""Run by real ranks (torchrun): how much anonymous memory each rank adds at its peak while the
policy's model is loaded under ZeRO-3 (before DeepSpeed adds its optimizer state) and while the
frozen reference engine is built, sampled every few milliseconds, and how many elements of the
model each rank's partitions hold. usage: load_memory.py MODEL_DIR DS_CONFIG OUT"""

import json
import sys
import threading
import time


def anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The peak of RssAnon while the block runs, above what it was when the block began."""

    def __enter__(self):
        self.start = self.peak = anonymous_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, anonymous_bytes())
        self.rise = self.peak - self.start


def partition_elements(model) -> int:
    return sum(int(p.ds_tensor.numel()) for p in model.parameters())


def main(model_dir: str, ds_config_path: str, out: str) -> None:
    from plot_ds.config import load_config
    from plot_ds.distributed.process_group import init_distributed
    from plot_ds.engine.ds_config import load_ds_config
    from plot_ds.engine.engines import build_reference_engine
    from plot_ds.engine.models import load_model

    dist = init_distributed()
    config = load_config(
        None,
        {
            "model.name_or_path": model_dir,
            "deepspeed.config": ds_config_path,
            "train.precision": "fp32",
            "plot.enabled": False,
        },
    )
    ds_config = load_ds_config(config, dist.world_size)
    load_model(config, ds_config)  # warm: imports, kernels and allocator caches first
    with PeakSampler() as policy_load:
        policy = load_model(config, ds_config)
    with PeakSampler() as reference_load:
        reference, _ = build_reference_engine(config, ds_config)
    result = {
        "rank": dist.rank,
        "policy_rise": policy_load.rise,
        "reference_rise": reference_load.rise,
        "policy_elements": partition_elements(policy),
        "reference_elements": partition_elements(reference.module),
        "model_elements": sum(int(p.ds_numel) for p in policy.parameters()),
    }
    with open(f"{out}.rank{dist.rank}", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
