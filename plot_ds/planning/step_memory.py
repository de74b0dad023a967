"""What one micro-batch's forward and backward hold per rank, beyond the model states: the tensors
autograd saves in each decoder layer, the head's, PLOT's, and the reference's.

The per-layer rules count what transformers' decoder layers save for their backward, per token (d
hidden, q and kv the query and key/value widths, h heads, I the MLP width, b the model's bytes per
element): the two RMSNorms and the residual stream (8 + 4 b) d (a float32 copy of the input, its
normalised form, the output in the model's dtype; in float32 the input itself); the attention its
rotated queries, keys and values and its output (2 b q + 2 b kv) and a float32 log-sum-exp per head
(4 h); the gated MLP its two projections, their activation and their product (4 b I per expert a
token visits); an int64 per token. Per-head query/key norms add (4 + b) (q + kv) + 4 (h + kv
heads). Eager attention keeps its float32 probabilities (and their cast to a 16-bit dtype) per
token and position, and keys and values repeated to every head, instead of the log-sum-exp.
tests/planning/test_memory_plan.py counts these with saved_tensors_hooks on tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model_shape import ModelShape

FLOAT32 = 4
# A micro-batch's row tensors (ids, masks, labels, positions): int64 each.
ROW_TENSORS = 4
# TargetLogProb's chunk of rows (forward/logprobs.py) read as float32, twice over (logits and softmax).
LOGPROB_CHUNK = 256


@dataclass(frozen=True)
class MicroBatchShape:
    """The largest micro-batch a rank runs: its rows (2 per pair), their padded width, and the
    response positions over all of them (the head and PLOT run on these only)."""

    rows: int
    width: int
    response_positions: int
    tokens: int  # positions the layers run: rows x width padded; fewer where prompts are shared or rows packed
    # Prompt sharing: the prompts' pass is this wide, the responses' passes that wide (0: plain rows).
    prompt_width: int = 0
    response_width: int = 0

    def per_rank(self, sequence: int) -> "MicroBatchShape":
        """One rank's share under sequence parallelism: a 1/sequence slice of every row."""
        width = -(-self.width // sequence)
        return MicroBatchShape(self.rows, width, -(-self.response_positions // sequence), self.rows * width)


@dataclass(frozen=True)
class StepSettings:
    """The run's settings that change what a step holds (resolved: the head tiled or not)."""

    element_size: int
    gradient_checkpointing: bool
    tiled_mlp: bool
    tiled_head: bool
    tile_positions: int
    eager_attention: bool
    sequence: int
    lora_rank: int  # 0 without adapters
    lora_dropout: float
    lora_targets: tuple[str, ...] | None  # None: all-linear
    linear_keeps_inputs: bool  # ZeRO-3 runs linears through its own function, which saves the input
    plot_active: bool
    plot_support: int  # slots per position: top_k + 1, or the vocabulary
    plot_closed_form: bool
    reference_logits: bool  # ref_mix: the reference's [N, V] logits wait for PLOT


def layer_bytes_per_token(shape: ModelShape, settings: StepSettings, width: int) -> float:
    """What one decoder layer saves for its backward, per token of the micro-batch."""
    b, d = settings.element_size, shape.hidden_size
    q, kv, h = shape.query_width, shape.kv_width, shape.heads
    saved = (2 * FLOAT32 + 4 * b) * d + 2 * b * (q + kv) + FLOAT32 * h + 8
    if not settings.tiled_mlp:
        saved += 4 * b * shape.intermediate_size * shape.experts_per_token
    if shape.experts_per_token > 1:  # the router's dispatch copies of the hidden state
        saved += 2 * b * d * shape.experts_per_token
    if shape.qk_norm:
        saved += (FLOAT32 + b) * (q + kv) + FLOAT32 * (h + shape.kv_heads)
    if settings.eager_attention:
        saved += (FLOAT32 + (b if b != FLOAT32 else 0)) * h * width + 2 * b * (q - kv) - FLOAT32 * h
    return saved + lora_bytes_per_token(shape, settings)


# Linear layers by the input they read, across families: the attention's input, the MLP's, and the
# MLP's product (LoRA's frozen base keeps an input only where something else needs it).
ATTENTION_INPUT = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn"}
MLP_INPUT = {"gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc"}
MLP_PRODUCT = {"down_proj", "w2", "fc2", "c_proj"}


def lora_bytes_per_token(shape: ModelShape, settings: StepSettings) -> float:
    """LoRA's change to a decoder layer's saved tensors, per token: each adapted linear keeps its
    rank-r intermediate, and with dropout the dropped-out input and its mask (both in the model's
    dtype); frozen norms keep no normalised input for their weights. Frozen linears keep no input
    either, unless ZeRO-3's linear function (which keeps it always) runs them: then the attention's
    and the MLP's inputs and the MLP's product go unsaved where no adapter reads them undropped."""
    if not settings.lora_rank:
        return 0.0
    b, d = settings.element_size, shape.hidden_size
    adapted = [linear for linear in adapted_linears(shape, settings.lora_targets) if linear.per_layer]
    dropout = settings.lora_dropout > 0
    total = sum(settings.lora_rank * b + (2 * linear.in_features * b if dropout else 0) for linear in adapted)
    total = total / shape.layers - 2 * d * b
    if not settings.linear_keeps_inputs:
        names = {linear.name for linear in adapted}
        width = {"attention": d, "mlp": d, "product": shape.intermediate_size * shape.experts_per_token}
        for group, members in (("attention", ATTENTION_INPUT), ("mlp", MLP_INPUT), ("product", MLP_PRODUCT)):
            if dropout or not names & members:
                total -= width[group] * b
    return total


def adapted_linears(shape: ModelShape, targets: tuple[str, ...] | None):
    return [linear for linear in shape.linears if targets is None or linear.name in targets]


def activation_bytes(shape: ModelShape, settings: StepSettings, batch: MicroBatchShape) -> tuple[float, float]:
    """(what the layers keep until their backward, the extra the backward of one layer needs) for
    ``batch`` as one rank runs it."""
    tokens, b, d = batch.tokens, settings.element_size, shape.hidden_size
    layer = layer_bytes_per_token(shape, settings, batch.width * settings.sequence) * tokens
    # The final norm, and the row tensors of the micro-batch.
    outside = tokens * ((FLOAT32 + b) * d + ROW_TENSORS * 8)
    # A layer's backward: the gradient of its output and input, and of its widest intermediate.
    working = tokens * b * (2 * d + 2 * shape.intermediate_size * shape.experts_per_token)
    if settings.tiled_mlp:
        working = tokens * b * 2 * d + min(tokens, d) * b * 6 * shape.intermediate_size
    if settings.sequence > 1:  # Ulysses' all-to-all buffers for queries, keys, values and output
        working += 2 * tokens * b * (2 * shape.query_width + 2 * shape.kv_width)
    cache = shared_attention_bytes(shape, settings, batch) * shape.layers
    if settings.gradient_checkpointing:
        return shape.layers * tokens * b * d + outside, layer + working
    return shape.layers * layer + outside + cache, working


def shared_attention_bytes(shape: ModelShape, settings: StepSettings, batch: MicroBatchShape) -> float:
    """Per layer, what prompt sharing's response passes save beyond plain rows of their length: the
    attention, handed a mask, takes keys and values repeated to every head and over the prompt's
    positions too, and keeps the float32 mask."""
    if not batch.response_width:
        return 0.0
    b, rows, span = settings.element_size, batch.rows, batch.response_width
    context = batch.prompt_width + span
    keys_values = rows * context * 2 * b * shape.query_width - rows * span * 2 * b * shape.kv_width
    return keys_values + rows * span * context * FLOAT32


def head_bytes(shape: ModelShape, settings: StepSettings, positions: int) -> tuple[float, float]:
    """(what the head keeps for its backward, the extra its backward needs) for ``positions``
    response positions: the whole head keeps its [N, V] logits (its gradient takes their place);
    the tiled head keeps the hidden states and sums the weight's gradient in float32."""
    b, d, vocab = settings.element_size, shape.hidden_size, shape.vocab_size
    support = positions * (settings.plot_support if settings.plot_active else 0) * (8 + FLOAT32)
    if settings.tiled_head:
        tile = min(positions, settings.tile_positions) * vocab
        return positions * d * b + support, vocab * d * FLOAT32 + tile * (b + 2 * FLOAT32)
    chunk = min(positions, LOGPROB_CHUNK) * vocab * 2 * FLOAT32
    return positions * (vocab * b + d * b) + support, chunk


def plot_bytes(shape: ModelShape, settings: StepSettings, positions: int) -> float:
    """PLOT's tensors from its forward to its backward: per position and support slot the
    probabilities, costs and ids; with a solver (not the closed form), the support's embedding rows
    and cost matrices; the embedding rows of the distinct targets."""
    if not settings.plot_active:
        return 0.0
    k, d = settings.plot_support, shape.hidden_size
    slots = positions * k
    total = slots * 3 * FLOAT32 + min(shape.vocab_size, positions) * d * FLOAT32
    if not settings.plot_closed_form:
        total += slots * d * FLOAT32 + 3 * positions * k * k * FLOAT32
    if settings.reference_logits:
        total += positions * shape.vocab_size * settings.element_size
    return total


def inference_bytes(shape: ModelShape, settings: StepSettings, batch: MicroBatchShape) -> float:
    """A forward without gradients (the reference's): one layer's widest tensors at a time, and the
    head's output over the response positions (a tile of it when tiled)."""
    b = settings.element_size
    layer = batch.tokens * b * (3 * shape.hidden_size + shape.query_width + 2 * shape.kv_width)
    layer += batch.tokens * b * 3 * shape.intermediate_size * shape.experts_per_token
    positions = batch.response_positions
    if settings.tiled_head:
        head = min(positions, settings.tile_positions) * shape.vocab_size * (b + 2 * FLOAT32)
    else:
        head = positions * shape.vocab_size * b + min(positions, LOGPROB_CHUNK) * shape.vocab_size * 2 * FLOAT32
    return max(layer, head)
