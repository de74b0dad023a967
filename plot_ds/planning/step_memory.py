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
    cached_positions: int = 0  # prompt positions the responses attend to from a key/value cache

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


def lora_bytes_per_token(shape: ModelShape, settings: StepSettings) -> float:
    """LoRA per layer: each adapted linear's dropout output and mask (with dropout) and its rank-r
    intermediate."""
    if not settings.lora_rank:
        return 0.0
    b, total = settings.element_size, 0.0
    for linear in adapted_linears(shape, settings.lora_targets):
        if linear.per_layer:
            total += 2 * settings.lora_rank * b
            if settings.lora_dropout > 0:
                total += linear.in_features * (b + 1)
    return total / shape.layers


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
    # Prompt sharing: each response's attention keeps the prompt's keys and values as well.
    cache = batch.cached_positions * 2 * b * shape.kv_width * shape.layers
    if settings.gradient_checkpointing:
        return shape.layers * tokens * b * d + outside, layer + working
    return shape.layers * layer + outside + cache, working


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
