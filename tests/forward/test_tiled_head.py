"""The tiled LM head: the same log-probs, supports and gradients as the whole [N, V] head, with no
[N, V] tensor; which heads it refuses."""

import pytest
import torch

from plot_ds.config import load_config
from plot_ds.data import collate
from plot_ds.data.tokenize import TokenizedPair
from plot_ds.engine.engines import TILED_ABOVE_BYTES, head_tiling
from plot_ds.errors import ModelError
from plot_ds.forward.logprobs import target_logps_and_support
from plot_ds.forward.packing import Packing
from plot_ds.forward.pair_forward import ForwardLayout, forward_pairs
from plot_ds.forward.prompt_sharing import prompt_sharing
from plot_ds.forward.tiled_head import TiledHeadLogProb, tile_positions, why_not_tiled

EXACT = dict(rtol=1e-6, atol=1e-6)


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """float32 rounding of sums taken in another order (a tile at a time): the difference's norm
    within 1e-5 of the tensor's (the largest seen is about 1e-6), no element off by more than 1e-5
    of the largest."""
    difference = float((got - expected).norm())
    assert difference <= 1e-5 * max(float(expected.norm()), 1e-30), (
        f"{what}: relative difference {difference / float(expected.norm()):.3g}"
    )
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def whole_head(hidden, weight, bias, targets, top_k):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logps, support = target_logps_and_support(logits, targets, top_k)
    return logps, support.logits, support.ids


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("tile", [1, 7, 37, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tiled_head_equals_the_whole_head(top_k, tile, with_bias):
    """Outputs and the gradients of hidden states, weight and bias, under upstream gradients on both
    the log-probs and the support logits (PLOT's), for tiles that do and do not divide N."""
    torch.manual_seed(0)
    n, d, vocab = 37, 16, 50
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True) if with_bias else None
    targets = torch.randint(vocab, (n,))
    grad_logps, grad_support = torch.randn(n), torch.randn(n, top_k + 1 if top_k else 0)
    results = []
    for compute in (whole_head, lambda *a: TiledHeadLogProb.apply(*a[:4], tile, a[4])):
        logps, support_logits, support_ids = compute(hidden, weight, bias, targets, top_k)
        inputs = [t for t in (hidden, weight, bias) if t is not None]
        grads = torch.autograd.grad(
            (logps * grad_logps).sum() + (support_logits * grad_support).sum(), inputs, allow_unused=True
        )
        results.append((logps, support_logits, support_ids, grads))
    (logps, logits, ids, grads), (tiled_logps, tiled_logits, tiled_ids, tiled_grads) = results
    torch.testing.assert_close(tiled_logps, logps, **EXACT)
    assert torch.equal(tiled_ids, ids)
    torch.testing.assert_close(tiled_logits, logits, **EXACT)
    for tiled, whole, name in zip(tiled_grads, grads, ("hidden", "weight", "bias")):
        assert_same(tiled, whole, name)


def test_tiled_head_never_holds_n_by_v():
    """The largest tensor the forward and backward allocate is a tile's logits, not [N, V]."""
    n, d, vocab, tile = 512, 8, 1000, 64
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(vocab, (n,))
    largest = []

    class Largest(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    with Largest():
        logps, support_logits, _ = TiledHeadLogProb.apply(hidden, weight, None, targets, tile, 4)
        (logps.sum() + support_logits.sum()).backward()
    assert max(largest) == tile * vocab  # a tile's logits; the weight's gradient is vocab * d
    assert vocab * d < tile * vocab < n * vocab


PAIRS = [
    TokenizedPair("a", [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 2], [13, 2]),
    TokenizedPair("b", [20, 21], [22, 2], [23, 24, 25, 26, 27, 28, 29, 2]),
    TokenizedPair("c", [30, 31, 32], [40, 41, 42, 2], [33, 34, 2]),
]


@pytest.mark.parametrize("rows", ["plain", "shared", "packed"])
@pytest.mark.parametrize("top_k", [0, 8])
def test_tiled_forward_equals_the_whole_head(tiny_model_dir, rows, top_k):
    """Through the model's own forward (the head swapped for the tiled one for that forward), on
    plain rows, over prompt sharing's passes and on packed rows: per-pair log-probs, supports and
    every parameter's gradient (the tied embedding's included) as the whole head's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    layout_rows = {
        "plain": None,
        "shared": prompt_sharing(model, True),
        "packed": Packing(share_prompt=False, varlen=False),
    }[rows]
    batch = collate(PAIRS, pad_id=2)
    results = []
    for head_tile in (0, 4):
        model.zero_grad()
        out = forward_pairs(model, batch, False, top_k, ForwardLayout(layout_rows, head_tile))
        loss = out.logps.chosen.sum() - 0.5 * out.logps.rejected.sum()
        if top_k:
            loss = loss + out.support.logits.square().mean()
        loss.backward()
        results.append((out, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (whole, whole_grads), (tiled, tiled_grads) = results
    assert tiled.logits is None
    for field in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(getattr(tiled.logps, field), getattr(whole.logps, field), **EXACT)
    if top_k:
        assert torch.equal(tiled.support.ids, whole.support.ids)
        torch.testing.assert_close(tiled.support.logits, whole.support.logits, **EXACT)
    for name, grad in whole_grads.items():
        assert_same(tiled_grads[name], grad, name)


def test_the_head_is_tiled_only_where_it_can_be(tiny_model_dir, tmp_path):
    """auto tiles a plain Linear head where a micro-batch's logits would pass
    engines.TILED_ABOVE_BYTES; a model that soft-caps its logits keeps the whole head under auto and
    is refused under true, with the reason."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = lambda setting: load_config(None, {"model.tiled_head": setting})  # noqa: E731
    tile, above = head_tiling(config("auto"), llama)
    assert tile == tile_positions(llama.config.vocab_size) and above == TILED_ABOVE_BYTES // (49152 * 4)
    assert head_tiling(config(True), llama) == (tile, 0)
    assert head_tiling(config(False), llama) == (0, 0)
    layout = ForwardLayout(None, tile, above)
    assert not layout.tiles(above, keep_logits=False) and layout.tiles(above + 1, keep_logits=False)
    assert not layout.tiles(above + 1, keep_logits=True)  # a loss that reads the logits gets them

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, head_dim=8)
    gemma = Gemma2ForCausalLM(Gemma2Config(num_attention_heads=2, num_key_value_heads=1, **small))
    assert "soft-caps" in why_not_tiled(gemma)
    assert head_tiling(config("auto"), gemma) == (0, 0)
    with pytest.raises(ModelError, match="model.tiled_head true: Gemma2ForCausalLM cannot tile its head"):
        head_tiling(config(True), gemma)


def test_tiled_head_under_lora_adapters(tiny_model_dir):
    """LoRA on the decoder (peft): the head is the frozen base's (no weight gradient is computed
    for it), and the adapters' gradients equal the whole head's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert why_not_tiled(model) is None
    batch = collate(PAIRS, pad_id=2)
    grads = []
    for head_tile in (0, 4):
        model.zero_grad()
        out = forward_pairs(model, batch, False, 8, ForwardLayout(None, head_tile))
        (out.logps.chosen.sum() - out.logps.rejected.sum() + out.support.logits.square().mean()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and all("lora" in name for name in grads[0])
    for name, grad in grads[0].items():
        assert_same(grads[1][name], grad, name)
