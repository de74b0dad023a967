"""Real ranks (torchrun, gloo, ZeRO-3 on CPU) through plot_ds.training.train_step."""
import pytest
import torch

from conftest import WORKERS, torchrun

pytestmark = pytest.mark.distributed
SPLITS = ("1x4", "2x2", "4x1")  # per-rank micro-batch x accumulation steps; 2 ranks, 8 pairs


@pytest.fixture(scope="module")
def step_results(tiny_model_dir, zero3_test_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("grads")
    worker = WORKERS / "step_gradients.py"
    torchrun(1, worker, tiny_model_dir, zero3_test_config, out / "one", "8x1")
    torchrun(2, worker, tiny_model_dir, zero3_test_config, out / "two", ",".join(SPLITS))
    load = lambda p: torch.load(p, weights_only=True)
    return {"one": load(out / "one.rank0"),
            "two": [load(out / "two.rank0"), load(out / "two.rank1")]}


@pytest.mark.parametrize("objective", ["sft", "dpo"])
@pytest.mark.parametrize("split", SPLITS)
def test_step_gradient_equals_one_process_run(step_results, objective, split):
    single = step_results["one"][f"{objective}:8x1"]
    for rank_results in step_results["two"]:
        two = rank_results[f"{objective}:{split}"]
        assert two["global_batch"] == single["global_batch"]
        assert two["pairs"] == 8
        assert two["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            assert grad.abs().max() > 0, f"{name}: zero gradient, nothing was compared"
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                       msg=lambda m: f"{objective} {split} {name}: {m}")
        assert two["metrics"]["loss/total"] == pytest.approx(single["metrics"]["loss/total"], rel=1e-5)


def test_parameters_are_partitioned_not_replicated(step_results):
    ranks = [r["sft:2x2"]["partition"] for r in step_results["two"]]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        local = [r[name][0] for r in ranks]
        full = ranks[0][name][1]
        assert all(n < full for n in local), f"{name}: a rank holds the whole tensor {local} of {full}"
        assert sum(local) >= full, f"{name}: partitions {local} do not cover {full} elements"
        assert all(r[name][2] == 0 for r in ranks), f"{name}: left gathered outside forward"
