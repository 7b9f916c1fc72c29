"""What the three models share: masks from the packed batch, the segment-aware causal conv,
the gated MLP, the residual block and the language-model shell (embedding, blocks, head).

The batch layout is `objective_server.packing`'s: `attention_mask` 1 = prefix (read
bidirectionally), 3 = suffix (causal), 0 = padding; `segment_ids` 1, 2, ... per example in a
row (0 on padding); `position_ids` restart at 0 per example. Everything a layer needs to stay
inside its example is derived here once per forward pass (`SequenceMasks`), so no layer and no
kernel has a notion of documents: recurrences are cut by zero gates, the conv by zero taps,
attention by a boolean matrix.

Bidirectional recurrent layers split their channels: [0, split) scan left to right over the
whole row, [split, width) scan right to left with gate and input zero outside the prefix and
the gate also zero where the next position starts another example (birdie-method.md §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
PADDING, PREFIX, SUFFIX = 0, 1, 3  # attention_mask codes (objective_server.packing)


# ---------------------------------------------------------------------------------------------
# Masks from the batch arrays
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceMasks:
    """Where examples start and which positions are prefix, for a (B, L) packed batch."""

    segment_start: Tensor  # bool (B, L): first position of an example (or of a padding run)
    prefix: Tensor  # bool (B, L): bidirectional region
    offset: Tensor  # long (B, L): distance from the first position of the position's segment
    reverse_keep: Tensor  # bool (B, L): the right-to-left state at t may read the one at t+1
    position_ids: Tensor  # long (B, L): RoPE positions

    @property
    def forward_keep(self) -> Tensor:
        """bool (B, L): the left-to-right state at t may read the one at t-1."""
        return ~self.segment_start

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.prefix.shape)

    @classmethod
    def decode_step(cls, batch_size: int, position: int, device: torch.device | str | None = None) -> "SequenceMasks":
        """Masks of one generated (suffix) token at `position` of its example."""

        def full(value, dtype):
            return torch.full((batch_size, 1), value, dtype=dtype, device=device)

        return cls(
            segment_start=full(position == 0, torch.bool),
            prefix=full(False, torch.bool),
            offset=full(position, torch.long),
            reverse_keep=full(False, torch.bool),
            position_ids=full(position, torch.long),
        )


def sequence_masks(
    attention_mask: Tensor | None,
    segment_ids: Tensor | None,
    position_ids: Tensor | None = None,
    *,
    shape: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> SequenceMasks:
    """`SequenceMasks` from the batch arrays.

    Missing arrays mean the plain-LM case: no `attention_mask` = every position causal, no
    `segment_ids` = one example per row, no `position_ids` = distance from the example start.
    `shape`/`device` are needed only when no array is given.
    """
    given = next((t for t in (attention_mask, segment_ids, position_ids) if t is not None), None)
    if given is not None:
        shape, device = tuple(given.shape), given.device
    if shape is None or len(shape) != 2:
        raise ValueError(f"batch arrays must be (B, L), got shape {shape}")
    for name, t in (("attention_mask", attention_mask), ("segment_ids", segment_ids), ("position_ids", position_ids)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} like the other batch arrays")
        if t is not None and (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    batch, length = shape

    if attention_mask is None:
        prefix = torch.zeros(shape, dtype=torch.bool, device=device)
    else:
        bad = (attention_mask != PADDING) & (attention_mask != PREFIX) & (attention_mask != SUFFIX)
        # The check syncs with the device; a compiled graph skips it rather than break.
        if not torch.compiler.is_compiling() and bool(bad.any()):
            raise ValueError(f"attention_mask values must be 0 (padding), 1 (prefix) or 3 (suffix); got {attention_mask[bad][:5].tolist()}")
        prefix = attention_mask == PREFIX

    segment_start = torch.zeros(shape, dtype=torch.bool, device=device)
    segment_start[:, 0] = True
    if segment_ids is not None:
        segment_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]

    index = torch.arange(length, device=device).expand(batch, length)
    start_index = torch.where(segment_start, index, torch.zeros_like(index)).cummax(dim=1).values
    offset = index - start_index

    # The reverse state at t reads t+1 only if both are prefix of the same example.
    reverse_keep = torch.zeros_like(prefix)
    reverse_keep[:, :-1] = prefix[:, :-1] & prefix[:, 1:] & ~segment_start[:, 1:]

    return SequenceMasks(
        segment_start=segment_start,
        prefix=prefix,
        offset=offset,
        reverse_keep=reverse_keep,
        position_ids=offset if position_ids is None else position_ids.long(),
    )


def attention_allowed(masks: SequenceMasks, bidirectional: bool) -> Tensor:
    """bool (B, 1, L, L): query q may attend to key k iff same example and (k <= q, or both
    in the prefix when `bidirectional`). Padding attends causally among itself, so no row is
    empty."""
    _, length = masks.shape
    device = masks.prefix.device
    # Numbering the segment starts gives each example (and each padding run) its own id.
    segment_number = masks.segment_start.long().cumsum(dim=1)
    same_segment = segment_number[:, :, None] == segment_number[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal[None]
    if bidirectional:
        allowed = allowed | (masks.prefix[:, :, None] & masks.prefix[:, None, :])
    return (same_segment & allowed)[:, None]


def layer_is_bidirectional(bidirectional: bool, layer_index: int) -> bool:
    """Half the layers of a bidirectional model are bidirectional: the even-numbered ones."""
    return bidirectional and layer_index % 2 == 0


def direction_masks(masks: SequenceMasks, width: int, split: int) -> tuple[Tensor, Tensor]:
    """(gate_keep, input_keep), bool (B, L, width), for a scan whose channels [0, split) run
    left to right and [split, width) right to left.

    Left-to-right channels: gate cut at example starts, input everywhere. Right-to-left
    channels: gate kept only between two prefix positions of one example, input only in the
    prefix, so their state is zero on the suffix and on padding.
    """
    if not 0 <= split <= width:
        raise ValueError(f"split must lie in [0, {width}], got {split}")
    forward_keep = masks.forward_keep[..., None]
    if split == width:
        shape = (*masks.shape, width)
        everywhere = torch.ones((), dtype=torch.bool, device=forward_keep.device).expand(shape)
        return forward_keep.expand(shape), everywhere
    is_reverse = torch.arange(width, device=forward_keep.device) >= split
    gate_keep = torch.where(is_reverse, masks.reverse_keep[..., None], forward_keep)
    input_keep = ~is_reverse | masks.prefix[..., None]
    return gate_keep, input_keep


def gate_dtype(t: Tensor) -> torch.dtype:
    """Gates are computed in float32 (float64 for float64 models): bf16 loses the decay."""
    return torch.promote_types(t.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def RMSNorm(dim: int, eps: float = 1e-6) -> nn.RMSNorm:
    """torch's RMSNorm with a learned scale; the one norm every model uses."""
    return nn.RMSNorm(dim, eps=eps)


def mlp_hidden_width(d_model: int, expansion: float, multiple_of: int = 64) -> int:
    """expansion * d_model rounded up to a multiple of `multiple_of` (768 * 8/3 -> 2048)."""
    return multiple_of * math.ceil(expansion * d_model / multiple_of - 1e-9)


class GatedMLP(nn.Module):
    """GeGLU feed-forward: down(GeLU(gate(x)) * up(x)), hidden width about 8/3 d_model."""

    def __init__(self, d_model: int, expansion: float = 8 / 3):
        super().__init__()
        self.hidden = mlp_hidden_width(d_model, expansion)
        self.gate_up = nn.Linear(d_model, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate) * up)

    def flops_per_token(self) -> float:
        return 2.0 * (self.gate_up.weight.numel() + self.down.weight.numel())


class SegmentCausalConv1d(nn.Module):
    """Depthwise causal conv over time whose taps never reach into an earlier example.

    y_t = b + sum_k w_k * x_{t-k}, k = 0 .. width-1, with the tap dropped when t-k lies before
    the first position of t's example (offset_t < k). Decoding keeps the last width-1 inputs.
    """

    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        if width < 1:
            raise ValueError(f"conv width must be >= 1, got {width}")
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))  # weight[:, k] is lag k
        self.bias = nn.Parameter(torch.zeros(channels))
        # torch's Conv1d default for a depthwise kernel (fan-in = width)
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(width), 1.0 / math.sqrt(width))

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        """x (B, L, C), offset (B, L) from `SequenceMasks.offset` -> (B, L, C)."""
        length = x.shape[1]
        padded = F.pad(x, (0, 0, self.width - 1, 0))
        y = self.bias + x * self.weight[:, 0]
        for lag in range(1, self.width):
            start = self.width - 1 - lag
            reaches_own_example = (offset >= lag)[..., None]
            y = y + torch.where(reaches_own_example, padded[:, start : start + length], 0.0) * self.weight[:, lag]
        return y

    def buffer(self, x: Tensor) -> Tensor:
        """The last width-1 inputs of x (B, L, C), zeros before the start: the decode buffer
        after `x` was the whole of an example so far."""
        return F.pad(x, (0, 0, self.width - 1, 0))[:, x.shape[1] :]

    def step(self, x: Tensor, buffer: Tensor) -> tuple[Tensor, Tensor]:
        """One token x (B, C) with the previous width-1 inputs (B, width-1, C), oldest first."""
        window = torch.cat([buffer, x[:, None]], dim=1)  # oldest .. newest
        y = self.bias + (window * self.weight.flip(-1).T).sum(dim=1)
        return y, window[:, 1:]

    def flops_per_token(self) -> float:
        return 2.0 * self.weight.numel()


# ---------------------------------------------------------------------------------------------
# Decode state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerState:
    """What one recurrent layer carries between tokens: its scan state and conv buffer."""

    scan: Tensor  # (B, width)
    conv: Tensor | None = None  # (B, conv_width - 1, width), oldest first


@dataclass(frozen=True)
class DecodeState:
    """All layers' states, and how many tokens of the current example have been read."""

    layers: tuple[LayerState, ...]
    position: int

    @property
    def batch_size(self) -> int:
        return self.layers[0].scan.shape[0]


# ---------------------------------------------------------------------------------------------
# The language-model shell
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp_expansion: float, norm_eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = GatedMLP(d_model, mlp_expansion)

    def forward(self, x: Tensor, context) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x), context)
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x: Tensor, masks: SequenceMasks) -> tuple[Tensor, LayerState]:
        mixed, state = self.mixer.prefill(self.mixer_norm(x), masks)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x: Tensor, state: LayerState, masks: SequenceMasks) -> tuple[Tensor, LayerState]:
        mixed, state = self.mixer.step(self.mixer_norm(x), state, masks)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class LanguageModel(nn.Module):
    """Token embedding, residual blocks around the given mixers, final norm, LM head.

    Subclasses build the mixers; `layer_context` turns the batch masks into what their
    mixers read (the masks themselves for the SSMs).
    """

    def __init__(self, config, mixers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, m, config.mlp_expansion, config.norm_eps) for m in mixers)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers) so
        # the residual stream's variance does not grow with depth. Mixers initialise their own
        # gates afterwards (their `reset_gates`).
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        residual_std = std / math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            nn.init.normal_(block.mlp.down.weight, std=residual_std)
            nn.init.normal_(block.mixer.out_proj.weight, std=residual_std)
            if hasattr(block.mixer, "reset_gates"):
                block.mixer.reset_gates()

    def layer_context(self, masks: SequenceMasks):
        return masks

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, L, vocab) for a packed batch (the objective server's arrays).

        Without `attention_mask` every position is causal; without `segment_ids` each row is
        one example.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        masks = sequence_masks(attention_mask, segment_ids, position_ids, shape=tuple(input_ids.shape), device=input_ids.device)
        if masks.shape != tuple(input_ids.shape):
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)} but the masks have {masks.shape}")
        context = self.layer_context(masks)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, context)
        return self.lm_head(self.norm(x))

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without the embedding."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) at sequence length
        `seq_len`: matmuls (LM head included), convs, scans and attention products; the
        elementwise gate arithmetic and norms are not counted (as in the usual MFU formula)."""
        forward = 2.0 * self.lm_head.weight.numel()
        for block in self.blocks:
            forward += block.mlp.flops_per_token() + block.mixer.flops_per_token(seq_len)
        return 3.0 * forward


class RecurrentLM(LanguageModel):
    """A language model whose mixers are recurrences: O(1) decoding with cached states.

    `prefill` reads an example's prefix exactly as training does (bidirectionally where the
    layer is bidirectional); `step` then generates the suffix one token at a time. Every mixer
    provides `init_state`, `prefill` and `step`.
    """

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DecodeState:
        """The state before the first token of an example (an empty prefix)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype if dtype is None else dtype
        return DecodeState(tuple(b.mixer.init_state(batch_size, device, dtype) for b in self.blocks), position=0)

    @torch.no_grad()
    def prefill(self, prefix_ids: Tensor) -> tuple[Tensor, DecodeState]:
        """Read one prefix per row ((B, N) token ids, N >= 1, all rows the same length).

        Returns the logits at the prefix positions (B, N, vocab) and the state after them.
        """
        if prefix_ids.dim() != 2 or prefix_ids.shape[1] < 1:
            raise ValueError(f"prefix_ids must be (B, N) with N >= 1, got shape {tuple(prefix_ids.shape)}")
        masks = sequence_masks(torch.full_like(prefix_ids, PREFIX), None)
        x = self.embed(prefix_ids)
        states = []
        for block in self.blocks:
            x, state = block.prefill(x, masks)
            states.append(state)
        return self.lm_head(self.norm(x)), DecodeState(tuple(states), position=prefix_ids.shape[1])

    @torch.no_grad()
    def step(self, token_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Read one suffix token per row ((B,) ids); logits (B, vocab) for the next one.

        `state` is not modified; the new state is returned.
        """
        if token_ids.dim() != 1 or token_ids.shape[0] != state.batch_size:
            raise ValueError(f"token_ids must be ({state.batch_size},), got shape {tuple(token_ids.shape)}")
        masks = SequenceMasks.decode_step(state.batch_size, state.position, token_ids.device)
        x = self.embed(token_ids)
        new_states = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block.step(x, layer_state, masks)
            new_states.append(layer_state)
        return self.lm_head(self.norm(x)), DecodeState(tuple(new_states), position=state.position + 1)


def lm_loss(logits: Tensor, label_ids: Tensor) -> Tensor:
    """Mean cross-entropy over positions with a label (label_ids are already shifted)."""
    return F.cross_entropy(logits.float().flatten(0, -2), label_ids.long().flatten(), ignore_index=IGNORE_INDEX)
