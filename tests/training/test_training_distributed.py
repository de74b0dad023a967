"""Real ranks (torchrun, gloo, ZeRO-3 on CPU) through plot_ds.training.loop.train_step."""

import pytest
import torch

from conftest import WORKERS, make_tiny_llama, torchrun

pytestmark = pytest.mark.distributed
SPLITS = ("1x4", "2x2", "4x1")  # per-rank micro-batch x accumulation steps; 2 ranks, 8 pairs


@pytest.fixture(scope="module")
def step_results(tiny_model_dir, zero3_test_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("grads")
    # A reference other than the policy's start, for the AOT variants: with the policy as its own
    # reference every AOT delta is 0 and its gradient is DPO's, which no broken sort would change.
    reference = make_tiny_llama(tmp_path_factory.mktemp("reference_llama"), tiny_model_dir, seed=1)
    worker = WORKERS / "step_gradients.py"
    torchrun(1, worker, tiny_model_dir, zero3_test_config, out / "one", "8x1", reference, output=out)
    torchrun(2, worker, tiny_model_dir, zero3_test_config, out / "two", ",".join(SPLITS), reference, output=out)
    load = lambda p: torch.load(p, weights_only=True)
    return {"one": load(out / "one.rank0"), "two": [load(out / "two.rank0"), load(out / "two.rank1")]}


@pytest.mark.parametrize(
    "objective",
    [
        "sft",
        "dpo",
        "dpo_shared_prompt",
        "aot",
        "aot_unpaired",
        "rpo",
        "dpo_uneven",
        "aot_uneven",
        "dpo+plot_packed_shared_uneven",
    ],
)
@pytest.mark.parametrize("split", SPLITS)
def test_step_gradient_equals_one_process_run(step_results, objective, split):
    """1x4 and 2x2 accumulate (AOT's global table then comes from a forward before the first loss),
    4x1 does not (its table is gathered right after the one forward). The _uneven variants take an
    epoch's short last global batch: 5 pairs dealt 3 and 2, with filler micro-batches (also packed,
    each pair prompt, chosen, rejected in one row under PLOT)."""
    single = step_results["one"][f"{objective}:8x1"]
    for rank_results in step_results["two"]:
        two = rank_results[f"{objective}:{split}"]
        assert two["global_batch"] == single["global_batch"]
        assert two["pairs"] == (5 if objective.endswith("_uneven") else 8)
        assert two["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            assert grad.abs().max() > 0, f"{name}: zero gradient, nothing was compared"
            torch.testing.assert_close(
                two["grads"][name],
                grad,
                rtol=1e-4,
                atol=1e-5 * grad.abs().max().item(),
                msg=lambda m: f"{objective} {split} {name}: {m}",
            )
        # AOT's beta of 10 amplifies float32 rounding of the summed log-probs tenfold.
        rel = 1e-4 if objective.startswith("aot") else 1e-5
        assert two["metrics"]["loss/total"] == pytest.approx(single["metrics"]["loss/total"], rel=rel)
    if objective == "rpo":  # both terms logged, the vanilla loss their weighted sum
        metrics = single["metrics"]
        assert metrics["loss/vanilla"] == pytest.approx(metrics["loss/dpo"] + 0.2 * metrics["loss/sft"], rel=1e-6)


def test_uneven_last_batches_have_filler_micro_batches(step_results):
    """What the _uneven variants cover: rank 1's share of the 5 pairs is 2, so at 1x4 two of its
    micro-batches and at 2x2 one of them are weightless fillers."""
    rank_1 = step_results["two"][1]
    for variant in ("dpo_uneven", "dpo+plot_packed_shared_uneven"):
        assert rank_1[f"{variant}:1x4"]["batch_weights"] == [1.0, 1.0, 0.0, 0.0]
        assert rank_1[f"{variant}:2x2"]["batch_weights"] == [1.0, 0.0]
        assert step_results["two"][0][f"{variant}:2x2"]["batch_weights"] == [1.0, 1.0]
    # The packed variant's fillers ran through the packed layout: one row per pass, as every pass.
    packed = rank_1["dpo+plot_packed_shared_uneven:1x4"]
    assert len(packed["packed_passes"]) == 2 * 4 and all(shape[0] == 1 for shape, _ in packed["packed_passes"])


@pytest.mark.parametrize("variant", ["aot", "aot_unpaired"])
def test_aot_sorts_over_the_whole_global_batch(step_results, variant):
    """Every split reaches the loss of the one-process global sort; and the reference differs from
    the policy enough that the deltas are not all 0 (where any sort would give log 2)."""
    import math

    single = step_results["one"][f"{variant}:8x1"]["metrics"][f"loss/{variant}"]
    assert abs(single - math.log(2)) > 0.02
    for rank_results in step_results["two"]:
        values = [rank_results[f"{variant}:{split}"]["metrics"][f"loss/{variant}"] for split in SPLITS]
        assert values == pytest.approx([single] * 3, rel=1e-4)


def test_parameters_are_partitioned_not_replicated(step_results):
    ranks = [r["sft:2x2"]["partition"] for r in step_results["two"]]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        local = [r[name][0] for r in ranks]
        full = ranks[0][name][1]
        assert all(n < full for n in local), f"{name}: a rank holds the whole tensor {local} of {full}"
        assert sum(local) >= full, f"{name}: partitions {local} do not cover {full} elements"
        assert all(r[name][2] == 0 for r in ranks), f"{name}: left gathered outside forward"


def test_shared_prompt_passes_give_the_full_rows_gradient(step_results):
    """Prompt pass + response passes over copies of the prompt cache, under ZeRO-3 on 2 ranks: the
    passes that really ran (a silent fall-back to full rows would record none), split by length as
    ``response_groups`` splits the rows, equal the full rows' gradients."""
    from plot_ds.forward.prompt_sharing import response_groups

    widths_differ = False
    for split in SPLITS:
        accumulation = int(split.split("x")[1])
        for rank_results in step_results["two"]:
            full, shared = rank_results[f"dpo:{split}"], rank_results[f"dpo_shared_prompt:{split}"]
            assert full["shared_passes"] == []
            # Per micro-batch, the reference's passes then the policy's: prompts, two response passes.
            passes = shared["shared_passes"]
            assert len(passes) == 6 * accumulation
            for index, lengths in enumerate(shared["response_lengths"]):
                reference, policy = passes[6 * index : 6 * index + 3], passes[6 * index + 3 : 6 * index + 6]
                lengths = torch.tensor(lengths)
                assert reference == policy and policy[0][0] == len(lengths) // 2  # one prompt row per pair
                responses = policy[1:]
                assert responses == [(len(group), int(lengths[group].max())) for group in response_groups(lengths)]
                widths_differ |= responses[0][1] != responses[1][1]
            for name, grad in full["grads"].items():
                torch.testing.assert_close(
                    shared["grads"][name],
                    grad,
                    rtol=1e-4,
                    atol=1e-5 * grad.abs().max().item(),
                    msg=lambda m: f"{split} {name}: {m}",
                )
            assert shared["metrics"]["loss/total"] == pytest.approx(full["metrics"]["loss/total"], rel=1e-5)
    assert widths_differ  # the length split was not trivial


def test_decoder_layers_are_gathered_whole_and_give_the_same_gradients(step_results, tiny_model_dir):
    """deepspeed.zero3_leaf_modules auto makes each decoder layer one ZeRO-3 gather (policy and
    reference); the step's gradients equal those of DeepSpeed's per-submodule gathering."""
    import json
    from pathlib import Path

    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    for split in SPLITS:
        for rank_results in step_results["two"]:
            leaves, per_submodule = rank_results[f"dpo:{split}"], rank_results[f"dpo_per_submodule:{split}"]
            assert leaves["leaf_modules"] == leaves["reference_leaf_modules"] == {"LlamaDecoderLayer": layers}
            assert per_submodule["leaf_modules"] == per_submodule["reference_leaf_modules"] == {}
            for name, grad in per_submodule["grads"].items():
                torch.testing.assert_close(
                    leaves["grads"][name],
                    grad,
                    rtol=1e-5,
                    atol=1e-6 * grad.abs().max().item(),
                    msg=lambda m: f"{split} {name}: {m}",
                )
            assert leaves["metrics"]["loss/total"] == pytest.approx(per_submodule["metrics"]["loss/total"], rel=1e-6)


def adamw_first_step(before: torch.Tensor, grad: torch.Tensor, decay: float) -> torch.Tensor:
    """torch's AdamW from fresh state with the worker's settings (lr 1e-3, betas (0.9, 0.95))."""
    param = before.clone().requires_grad_(True)
    param.grad = grad.clone()
    torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=decay).step()
    return param.detach()


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_update_is_adamw_on_the_step_gradient(step_results, objective):
    """The parameters the model runs with move by exactly AdamW's first step; fp32 training keeps
    one copy of the weights (the optimizer's master partition is the parameter partition) and one of
    the gradients (the optimizer steps on views of DeepSpeed's gradient buffer, not a flattened copy)."""
    for results in [step_results["one"][f"{objective}:8x1"]] + [r[f"{objective}:2x2"] for r in step_results["two"]]:
        assert results["master_is_partition"] and results["grads_are_buffer_views"]
        for name, grad in results["grads"].items():
            before, after = results["before"][name], results["after"][name]
            expected = adamw_first_step(before, grad, decay=0.1 if before.dim() >= 2 else 0.0)
            assert (after - before).abs().max() > 1e-4, f"{name} did not move"
            torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{objective} {name}: {m}")


PLOT_VARIANTS = ("dpo+plot", "dpo+plot_full", "dpo+plot_all_to_all", "dpo+plot_lora", "none+plot_ref_mix")


@pytest.mark.parametrize("variant", PLOT_VARIANTS)
@pytest.mark.parametrize("split", SPLITS)
def test_plot_step_gradient_equals_one_process_run(step_results, variant, split):
    single = step_results["one"][f"{variant}:8x1"]
    assert single["metrics"]["plot/w_chosen"] > 0
    for rank_results in step_results["two"]:
        two = rank_results[f"{variant}:{split}"]
        for name, grad in single["grads"].items():
            torch.testing.assert_close(
                two["grads"][name],
                grad,
                rtol=1e-4,
                atol=1e-5 * grad.abs().max().item(),
                msg=lambda m: f"{variant} {split} {name}: {m}",
            )
        for metric in ("loss/total", "loss/plot", "plot/w_chosen", "plot/w_rejected"):
            assert two["metrics"][metric] == pytest.approx(single["metrics"][metric], rel=1e-5, abs=1e-7)


def runs_of(step_results, variant: str):
    """(where, split, that run's record) of ``variant``: one process at 8x1, then each split of 2 ranks."""
    runs = [("one", "8x1", step_results["one"])] + [("two", split, r) for split in SPLITS for r in step_results["two"]]
    return [(where, split, results[f"{variant}:{split}"]) for where, split, results in runs]


def assert_same_step(got: dict, expected: dict, what: str) -> None:
    """The same gradients, loss and PLOT weights as ``expected`` (a one-process run)."""
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(
            got["grads"][name],
            grad,
            rtol=1e-4,
            atol=1e-5 * grad.abs().max().item(),
            msg=lambda m: f"{what} {name}: {m}",
        )
    for metric in ("loss/total", "loss/plot", "loss/dpo", "loss/aot", "plot/w_chosen", "plot/w_rejected"):
        if metric in expected["metrics"]:
            assert got["metrics"][metric] == pytest.approx(expected["metrics"][metric], rel=1e-5, abs=1e-7), what


@pytest.mark.parametrize("variant", ["dpo+plot_packed", "dpo+plot_packed_shared"])
def test_packed_step_equals_the_padded_one_at_1_and_2_ranks(step_results, variant):
    """data.packing under ZeRO-3: one forward per micro-batch over one row holding exactly the
    batch's tokens (no padding; with prompt sharing each prompt once, under a 4D mask), and the
    same loss, PLOT weights and gradients as padded rows (``dpo+plot``) in one process."""
    for where, split, got in runs_of(step_results, variant):
        micro_batches = len(got["input_tokens"])
        # Per micro-batch the reference's pass, then the policy's.
        assert len(got["packed_passes"]) == 2 * micro_batches and got["shared_passes"] == []
        for index, tokens in enumerate(got["input_tokens"]):
            for shape, mask in got["packed_passes"][2 * index : 2 * index + 2]:
                assert shape[0] == 1
                if variant == "dpo+plot_packed":
                    assert shape[1] == tokens and mask is None
                else:  # each prompt once: fewer tokens than the rows hold
                    assert shape[1] < tokens and mask == (1, 1, shape[1], shape[1])
        assert_same_step(got, step_results["one"]["dpo+plot:8x1"], f"{variant} {where} {split}")


@pytest.mark.parametrize("variant", ["dpo+plot_tiled"])
def test_tiled_head_step_equals_the_whole_head_at_1_and_2_ranks(step_results, variant):
    """The LM head a tile of positions at a time under ZeRO-3 (its weight gathered again for the
    backward's recomputation, tied to the embedding PLOT reads): the same loss, PLOT weights and
    gradients as the whole [N, V] head (``dpo+plot``) in one process."""
    for where, split, got in runs_of(step_results, variant):
        assert got["head_tiles"] > 2 * len(got["input_tokens"]), got["head_tiles"]  # several per forward
        assert_same_step(got, step_results["one"]["dpo+plot:8x1"], f"{variant} {where} {split}")


def test_lora_trains_only_the_adapters_against_the_base(step_results):
    """Only adapter weights have gradients (every one nonzero, so the comparison above compared
    them all); the frozen base's embedding still gives PLOT its geometry; DPO's log-ratios against
    the base with adapters off are not zero."""
    single = step_results["one"]["dpo+plot_lora:8x1"]
    assert single["grads"] and all(".lora_A." in name or ".lora_B." in name for name in single["grads"])
    assert all(grad.abs().max() > 0 for grad in single["grads"].values())
    assert any("lora_A" in name for name in single["grads"]) and any("lora_B" in name for name in single["grads"])
    assert single["metrics"]["plot/w_chosen"] > 0
    assert single["metrics"]["rewards/margins"] != 0 and single["metrics"]["loss/dpo"] != pytest.approx(
        0.6931, abs=1e-4
    )


def test_sliced_and_full_gather_paths_agree(step_results):
    results = [r for r in step_results["two"]]
    for split in SPLITS:
        sliced = results[0][f"dpo+plot:{split}"]
        full = results[0][f"dpo+plot_full:{split}"]
        for name, grad in full["grads"].items():
            torch.testing.assert_close(sliced["grads"][name], grad)
        # Partial dot products summed across ranks vs rows normalised first: rounding only.
        assert sliced["metrics"]["loss/total"] == pytest.approx(full["metrics"]["loss/total"], rel=1e-6)
        assert sliced["metrics"]["plot/slice_bytes"] < full["metrics"]["plot/slice_bytes"]
        assert full["metrics"]["plot/slice_path"] == 3 and sliced["metrics"]["plot/slice_path"] in (1, 2)
        # Rows from their owners are the full gather's rows: the same loss and gradients, bit for bit.
        owners = results[0][f"dpo+plot_all_to_all:{split}"]
        assert owners["metrics"]["plot/slice_path"] == 2
        assert owners["metrics"]["loss/total"] == full["metrics"]["loss/total"]
        for name, grad in full["grads"].items():
            assert torch.equal(owners["grads"][name], grad), name


@pytest.fixture(scope="module")
def many_rank_plot_results(tiny_model_dir, zero3_test_config, tmp_path_factory):
    """PLOT's step at 4 ranks (2 pairs each) and 8 ranks (1 pair each), through the chosen slice path
    and the owners' path forced; at 4 ranks also as one sequence group of 4 and as two of 2; the
    same global batch of 8 as the one-process run."""
    out = tmp_path_factory.mktemp("grads_many")
    variants = {4: "dpo+plot,dpo+plot_all_to_all,dpo+plot_seq4,dpo+plot_seq2", 8: "dpo+plot,dpo+plot_all_to_all"}
    results = {}
    for ranks, split in ((4, "2x1"), (8, "1x1")):
        torchrun(
            ranks,
            WORKERS / "step_gradients.py",
            tiny_model_dir,
            zero3_test_config,
            out / f"r{ranks}",
            split,
            tiny_model_dir,
            variants[ranks],
            timeout=1200,
            output=out,
        )
        results[ranks] = (split, [torch.load(out / f"r{ranks}.rank{r}", weights_only=True) for r in range(ranks)])
    return results


@pytest.mark.parametrize("ranks", [4, 8])
@pytest.mark.parametrize("variant", ["dpo+plot", "dpo+plot_all_to_all"])
def test_plot_step_at_4_and_8_ranks_equals_one_process(step_results, many_rank_plot_results, ranks, variant):
    single = step_results["one"][f"{variant}:8x1"]
    split, per_rank = many_rank_plot_results[ranks]
    for rank_results in per_rank:
        got = rank_results[f"{variant}:{split}"]
        assert got["global_batch"] == single["global_batch"] and got["pairs"] == 8
        for metric in ("loss/total", "loss/plot", "plot/w_chosen", "plot/w_rejected"):
            assert got["metrics"][metric] == pytest.approx(single["metrics"][metric], rel=1e-5, abs=1e-7)
        for name, grad in single["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
        if variant == "dpo+plot_all_to_all":
            assert got["metrics"]["plot/slice_path"] == 2


def test_slice_equals_rows_of_the_unpartitioned_matrix(step_results, tiny_model_dir):
    from safetensors.torch import load_file

    matrix = load_file(f"{tiny_model_dir}/model.safetensors")["model.embed_tokens.weight"]
    vocab, dim = matrix.shape
    for rank, rank_results in enumerate(step_results["two"]):
        got = rank_results["slice"]
        assert len(got["ids"]) == 37 + 50 * rank  # ranks asked for different numbers of rows
        assert got["ids"][0] == vocab - 1
        torch.testing.assert_close(got["sliced"], matrix[got["ids"]], rtol=0, atol=0)
        torch.testing.assert_close(got["full"], matrix[got["ids"]], rtol=0, atol=0)
        # Communication, received per rank (plot_ds/distributed/slice_cost.py): at 2 ranks the slice all-reduces
        # the requested rows of both ranks, after the other rank's ids and four sizes; a full gather
        # receives the other rank's half of the matrix.
        rows_moved = (37 + 87) * dim * 4
        assert rows_moved <= got["sliced_bytes"] <= rows_moved + (1 + 87) * 8 + 4 * 8
        assert got["full_bytes"] == vocab * dim * 4 // 2


def test_target_cosines_from_partial_dot_products(step_results, tiny_model_dir):
    from safetensors.torch import load_file

    matrix = load_file(f"{tiny_model_dir}/model.safetensors")["model.embed_tokens.weight"]
    unit = torch.nn.functional.normalize(matrix.float(), dim=-1)
    for rank_results in step_results["two"]:
        got = rank_results["slice"]
        expected = (unit[got["support"]] * unit[got["targets"]].unsqueeze(1)).sum(-1)
        torch.testing.assert_close(got["cosines"], expected, rtol=0, atol=2e-6)
        torch.testing.assert_close(got["cosines_full"], expected, rtol=0, atol=2e-6)
        assert got["cosines"][1, 3] == pytest.approx(1.0, abs=1e-6)  # a row with itself
        # Target rows of both ranks plus a few numbers per pair: far below the support rows.
        target_rows = sum(len(set(r["slice"]["targets"].tolist())) for r in step_results["two"])
        assert target_rows * matrix.shape[1] * 4 < got["cosine_bytes"] < matrix.numel() * 4 / 20


# Sequence groups against one process (the one-process run of the same objective and model), and
# the split of each forward: (launch, variant, group size, one-process variant).
SEQUENCE_VARIANTS = [
    ("two", "dpo+plot_lora_seq2", 2, "dpo+plot_lora"),
    ("two", "aot+plot_qwen3_zero2_seq2", 2, "aot+plot_qwen3"),
    (4, "dpo+plot_seq4", 4, "dpo+plot"),
    (4, "dpo+plot_seq2", 2, "dpo+plot"),
]


@pytest.mark.parametrize(("launch", "variant", "group", "baseline"), SEQUENCE_VARIANTS)
def test_sequence_groups_take_the_one_process_step(
    step_results, many_rank_plot_results, launch, variant, group, baseline
):
    """parallel.sequence: every rank of a group holds a contiguous 1/group of each row's positions
    (at its own place: the position ids say where) and its attention goes through DeepSpeed's Ulysses
    in every layer; the step's loss, PLOT weights and every gradient are the one-process run's, at 2
    ranks (one group: the Llama with LoRA (ZeRO-3 gathering per submodule) and DeepSpeed's tiled MLP;
    a Qwen3 under ZeRO-2 with AOT over the global batch, SFT, PLOT's ref_mix target on the
    reference's logits and the tiled head) and at 4 (one group of 4, whose 2 key/value heads Ulysses
    replicates; two groups of 2, each its own pairs)."""
    single = step_results["one"][f"{baseline}:8x1"]
    if launch == "two":
        per_rank, split = step_results["two"], "2x2"
    else:
        split, per_rank = many_rank_plot_results[launch]
    for rank, results in enumerate(per_rank):
        got = results[f"{variant}:{split}"]
        assert got["global_batch"] == single["global_batch"] and got["pairs"] == 8
        assert got["row_slices"] and got["ulysses_calls"] >= 2 * len(got["row_slices"])  # 2 layers each
        widths = {-(-full // group) for full in got["full_widths"]}
        for _, width, first in got["row_slices"]:
            assert width in widths and first == (rank % group) * width, (rank, got["row_slices"])
        assert_same_step(got, single, f"{variant} rank {rank}")
