"""The trainer's models on packed rows built with `objective_server.packing`.

Masking is tested by perturbation (change one token, see which outputs move), the layers against
loop-per-example references written straight from the equations, decoding against the full
forward pass. float64 wherever a comparison should be exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from objective_server.objectives.base import Example
from objective_server.packing import Batch, unpack_row, write_example
from trainer.models import build_model, lm_loss, model_config, sequence_masks
from trainer.models.common import IGNORE_INDEX, SegmentCausalConv1d, attention_allowed, direction_masks

VOCAB = 48
GENERATE_ID = 2
# (prefix length, suffix length) of the examples in each row; the rest of a row is padding.
LAYOUT = [[(6, 5), (7, 6), (3, 4)], [(10, 8), (5, 9)]]
SEQ_LEN = 40

TINY = dict(vocab_size=VOCAB, d_model=16, n_layers=3)
MODEL_CASES = [
    ("hawk", dict(rnn_width=12)),
    ("gated_ssm", dict(state_width=12)),
    ("transformer", dict(n_heads=2)),
]
RECURRENT = ["hawk", "gated_ssm"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These models are tiny: a second intra-op thread only adds synchronisation, and on a busy
    # 2-core machine its spin-waits make each matmul 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def packed_batch(layout=LAYOUT, seq_len=SEQ_LEN, seed=0) -> Batch:
    """Rows of examples with random tokens, written by the objective server's packer."""
    rng = np.random.default_rng(seed)
    batch = Batch.empty(len(layout), seq_len)
    for row, examples in enumerate(layout):
        offset = 0
        for segment, (n, m) in enumerate(examples, start=1):
            example = Example(
                input=rng.integers(3, VOCAB, n).astype(np.int32), label=rng.integers(3, VOCAB, m).astype(np.int32)
            )
            offset = write_example(batch, row, offset, segment, example, objective_id=0, generate_id=GENERATE_ID)
    return batch


def tensors(batch: Batch) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array.copy()) for name, array in batch.arrays().items()}


def make_model(name: str, bidirectional: bool, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    extra = dict(MODEL_CASES)[name]
    model = build_model(name, **{**TINY, **extra, **overrides}, bidirectional=bidirectional)
    return model.to(dtype).eval()


def run(model, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(arrays["input_ids"], arrays["attention_mask"], arrays["segment_ids"], arrays["position_ids"])


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def test_sequence_masks_on_a_hand_written_row():
    attention = torch.tensor([[1, 1, 3, 3, 1, 1, 1, 3, 0, 0]])
    segments = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    masks = sequence_masks(attention, segments)
    assert masks.segment_start.tolist() == [[1, 0, 0, 0, 1, 0, 0, 0, 1, 0]]
    assert masks.prefix.tolist() == [[1, 1, 0, 0, 1, 1, 1, 0, 0, 0]]
    assert masks.offset.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    # the reverse state is cut at the last prefix position of each example
    assert masks.reverse_keep.tolist() == [[1, 0, 0, 0, 1, 1, 0, 0, 0, 0]]
    assert masks.position_ids.tolist() == masks.offset.tolist()


def test_direction_masks_split_the_channels():
    masks = sequence_masks(torch.tensor([[1, 1, 3]]), torch.tensor([[1, 1, 1]]))
    gate_keep, input_keep = direction_masks(masks, width=4, split=2)
    # forward channels: gate cut only at the example start; input everywhere
    assert gate_keep[0, :, :2].tolist() == [[0, 0], [1, 1], [1, 1]]
    assert input_keep[0, :, :2].all()
    # reverse channels: gate kept from position 0 to 1 only; input only in the prefix
    assert gate_keep[0, :, 2:].tolist() == [[1, 1], [0, 0], [0, 0]]
    assert input_keep[0, :, 2:].tolist() == [[1, 1], [1, 1], [0, 0]]
    with pytest.raises(ValueError, match="split"):
        direction_masks(masks, width=4, split=5)


def test_attention_mask_matches_its_definition():
    arrays = tensors(packed_batch())
    masks = sequence_masks(arrays["attention_mask"], arrays["segment_ids"])
    for bidirectional in (False, True):
        allowed = attention_allowed(masks, bidirectional)[:, 0]
        seg, prefix = arrays["segment_ids"], arrays["attention_mask"] == 1
        for b in range(seg.shape[0]):
            for q in range(SEQ_LEN):
                for k in range(SEQ_LEN):
                    expected = bool(seg[b, q] == seg[b, k]) and (k <= q or (bidirectional and bool(prefix[b, q] and prefix[b, k])))
                    assert bool(allowed[b, q, k]) == expected, (b, q, k, bidirectional)


def test_bad_batch_arrays_are_refused():
    with pytest.raises(ValueError, match="0 \\(padding\\), 1 \\(prefix\\) or 3"):
        sequence_masks(torch.tensor([[1, 2, 3]]), None)
    with pytest.raises(ValueError, match="shape"):
        sequence_masks(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        sequence_masks(torch.ones(1, 3), None)
    model = make_model("hawk", False)
    with pytest.raises(ValueError, match="\\(B, L\\)"):
        model(torch.ones(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# The segment-aware conv
# ---------------------------------------------------------------------------------------------


def test_conv_equals_a_plain_causal_conv_run_per_example():
    torch.manual_seed(0)
    conv = SegmentCausalConv1d(5, width=4).double()
    with torch.no_grad():
        conv.bias.normal_()
    arrays = tensors(packed_batch())
    masks = sequence_masks(arrays["attention_mask"], arrays["segment_ids"])
    x = torch.randn(2, SEQ_LEN, 5, dtype=torch.float64)
    y = conv(x, masks.offset)
    # depthwise conv1d with left zero padding, applied to each example on its own
    kernel = conv.weight.flip(-1)[:, None, :]  # conv1d correlates; lag k sits at index width-1-k
    for b in range(2):
        seg = arrays["segment_ids"][b]
        for s in seg.unique():
            where = (seg == s).nonzero()[:, 0]
            piece = x[b, where].T[None]
            expected = F.conv1d(F.pad(piece, (3, 0)), kernel, conv.bias, groups=5)[0].T
            torch.testing.assert_close(y[b, where], expected, rtol=0, atol=1e-12)


def test_conv_step_equals_forward():
    torch.manual_seed(1)
    conv = SegmentCausalConv1d(3, width=4).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    full = conv(x, torch.arange(9).expand(2, 9))
    buffer = torch.zeros(2, 3, 3, dtype=torch.float64)
    for t in range(9):
        y, buffer = conv.step(x[:, t], buffer)
        torch.testing.assert_close(y, full[:, t], rtol=0, atol=1e-12)
        torch.testing.assert_close(buffer, conv.buffer(x[:, : t + 1]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The recurrent layers against per-example loops written from the equations
# ---------------------------------------------------------------------------------------------


def _examples(arrays):
    """(row, positions, prefix length) of every example."""
    batch = Batch(**{k: v.numpy() for k, v in arrays.items()})
    for row in range(batch.shape[0]):
        for ex in unpack_row(batch, row):
            n, m = len(ex.input), len(ex.label)
            yield row, torch.arange(ex.offset, ex.offset + n + m), n


def _bidirectional_loop(a, u, n_prefix, split, reset_input_scale=None):
    """h_t = a_t h_{t-1} + u_t on channels < split over the whole example; the mirror on channels
    >= split over the prefix only, zero on the suffix. `reset_input_scale` (T, D) replaces the
    input at the first position of each direction (Hawk's multiplier 1 at a cut)."""
    length, width = u.shape
    h = torch.zeros_like(u)
    state = torch.zeros(split, dtype=u.dtype)
    for t in range(length):
        if t == 0:
            state = u[t, :split] if reset_input_scale is None else reset_input_scale[t, :split]
        else:
            state = a[t, :split] * state + u[t, :split]
        h[t, :split] = state
    state = torch.zeros(width - split, dtype=u.dtype)
    for t in reversed(range(n_prefix)):
        if t == n_prefix - 1:
            state = u[t, split:] if reset_input_scale is None else reset_input_scale[t, split:]
        else:
            state = a[t, split:] * state + u[t, split:]
        h[t, split:] = state
    return h


@pytest.mark.parametrize("bidirectional", [False, True])
def test_hawk_recurrent_block_matches_the_rg_lru_equations(bidirectional):
    model = make_model("hawk", bidirectional)
    block = model.blocks[0].mixer  # layer 0 is bidirectional in a bidirectional model
    assert block.rg_lru.split == (6 if bidirectional else 12)
    arrays = tensors(packed_batch())
    masks = sequence_masks(arrays["attention_mask"], arrays["segment_ids"])
    torch.manual_seed(3)
    x = torch.randn(2, SEQ_LEN, 16, dtype=torch.float64)
    with torch.no_grad():
        y = block(x, masks)
        lru = block.rg_lru
        for row, where, n_prefix in _examples(arrays):
            gate, recurrent_in = block.in_proj(x[row, where]).chunk(2, dim=-1)
            conv = block.conv.bias.clone().expand(len(where), -1).clone()
            for t in range(len(where)):
                for lag in range(min(4, t + 1)):
                    conv[t] += block.conv.weight[:, lag] * recurrent_in[t - lag]
            r, i = torch.sigmoid(lru.gates(conv)).chunk(2, dim=-1)
            a = torch.sigmoid(lru.decay) ** (8.0 * r)  # the paper's form, not the log-space one
            u = torch.sqrt(1 - a**2) * i * conv
            h = _bidirectional_loop(a, u, n_prefix, lru.split, reset_input_scale=i * conv)
            expected = block.out_proj(F.gelu(gate) * h)
            torch.testing.assert_close(y[row, where], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gated_ssm_layer_matches_its_equations(bidirectional):
    model = make_model("gated_ssm", bidirectional)
    layer = model.blocks[0].mixer
    arrays = tensors(packed_batch())
    masks = sequence_masks(arrays["attention_mask"], arrays["segment_ids"])
    torch.manual_seed(4)
    x = torch.randn(2, SEQ_LEN, 16, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x, masks)
        for row, where, n_prefix in _examples(arrays):
            z, o = layer.in_proj(x[row, where]).chunk(2, dim=-1)
            i, f = layer.gates(x[row, where]).chunk(2, dim=-1)
            h = _bidirectional_loop(torch.sigmoid(f), torch.sigmoid(i) * z, n_prefix, layer.split)
            expected = layer.out_proj(F.gelu(o) * h)
            torch.testing.assert_close(y[row, where], expected, rtol=1e-10, atol=1e-12)


def test_rg_lru_decay_starts_where_griffin_puts_it():
    model = make_model("hawk", False)
    decay = model.blocks[0].mixer.rg_lru.decay
    a_at_full_gate = torch.sigmoid(decay) ** 8
    assert bool(((a_at_full_gate >= 0.9 - 1e-9) & (a_at_full_gate <= 0.999 + 1e-9)).all())


# ---------------------------------------------------------------------------------------------
# Masking by perturbation, whole models
# ---------------------------------------------------------------------------------------------


def _changed_positions(model, arrays, row, position):
    """bool (B, L): which outputs move when the token at (row, position) changes."""
    base = run(model, arrays)
    perturbed = {k: v.clone() for k, v in arrays.items()}
    old = int(perturbed["input_ids"][row, position])
    perturbed["input_ids"][row, position] = 3 + (old - 3 + 7) % (VOCAB - 3)
    return (run(model, perturbed) - base).abs().amax(dim=-1) > 1e-12


def _expected_changes(arrays, row, position, bidirectional):
    """Same example, and (at or after the position, or everywhere when it is in the prefix of a
    bidirectional model: the suffix follows the prefix and the prefix reads it all)."""
    seg = arrays["segment_ids"][row]
    same = torch.zeros(arrays["segment_ids"].shape, dtype=torch.bool)
    same[row] = seg == seg[position]
    if seg[position] == 0:  # padding: its own causal run
        same[row] = seg == 0
    later = torch.zeros_like(same)
    later[row, position:] = True
    in_prefix = bool(arrays["attention_mask"][row, position] == 1)
    return same if (bidirectional and in_prefix) else same & later


# Examples shorter than the conv (a tap of width 4 would reach two examples back), one-token
# prefixes (a reverse scan of length 1) and a row without padding.
SHORT_LAYOUT = [[(1, 1), (1, 2), (2, 1), (1, 1), (3, 2)], [(2, 2), (1, 3), (4, 1), (1, 2)]]


@pytest.mark.parametrize("layout,seq_len", [(LAYOUT, SEQ_LEN), (SHORT_LAYOUT, 16)], ids=["layout", "short"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", [c[0] for c in MODEL_CASES])
def test_every_perturbation_moves_exactly_the_allowed_outputs(name, bidirectional, layout, seq_len):
    """Changing any token moves the outputs of its own example that may read it, and nothing
    else: suffix outputs never see later tokens, prefix outputs do see later prefix tokens
    (bidirectional models), and no example sees another, through any layer or the conv."""
    model = make_model(name, bidirectional)
    arrays = tensors(packed_batch(layout=layout, seq_len=seq_len))
    with torch.no_grad():
        for row in range(len(layout)):
            for position in range(seq_len):
                changed = _changed_positions(model, arrays, row, position)
                expected = _expected_changes(arrays, row, position, bidirectional)
                assert torch.equal(changed, expected), (row, position, changed.nonzero().tolist())


def test_bidirectionality_is_real_for_prefix_positions():
    # The perturbation test above demands it; say it once more in words on one example.
    model = make_model("hawk", True)
    arrays = tensors(packed_batch())
    with torch.no_grad():
        changed = _changed_positions(model, arrays, row=0, position=5)  # last prefix token of example 1
    assert changed[0, :5].all(), "earlier prefix positions must read a later prefix token"
    assert not changed[0, 11:].any(), "example 2 must not see example 1"
    causal = make_model("hawk", False)
    with torch.no_grad():
        assert not _changed_positions(causal, arrays, row=0, position=5)[0, :5].any()


def test_perturbation_test_catches_a_conv_that_crosses_examples(monkeypatch):
    # Without the offset cut, the conv lets example 1's last token reach example 2's first.
    model = make_model("hawk", False)
    arrays = tensors(packed_batch())
    forward = SegmentCausalConv1d.forward
    monkeypatch.setattr(SegmentCausalConv1d, "forward", lambda self, x, offset: forward(self, x, torch.full_like(offset, 99)))
    with torch.no_grad():
        changed = _changed_positions(model, arrays, row=0, position=10)
    assert changed[0, 11], "a leaking conv must show up as a change in the next example"


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", RECURRENT)
def test_only_every_other_layer_reads_later_prefix_tokens(name, bidirectional):
    """Birdie §5: in a bidirectional model layers 0, 2, ... read the prefix both ways and layers
    1, 3, ... stay causal; a causal model has no bidirectional layer."""
    model = make_model(name, bidirectional, n_layers=4)
    masks = sequence_masks(torch.tensor([[1, 1, 1, 1, 3, 3]]), None)
    x = torch.randn(1, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    moved = x.clone()
    moved[0, 3] += 1.0  # the last prefix position
    with torch.no_grad():
        for index, block in enumerate(model.blocks):
            delta = (block.mixer(moved, masks) - block.mixer(x, masks)).abs().amax(dim=-1)[0]
            reads_later = delta[:3] > 1e-12
            if bidirectional and index % 2 == 0:
                assert reads_later.all(), (index, delta)
            else:
                assert not reads_later.any(), (index, delta)
            assert not delta[4:].eq(0).any(), (index, delta)  # the suffix follows the prefix


# ---------------------------------------------------------------------------------------------
# Recurrent decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", RECURRENT)
def test_prefill_then_step_equals_the_full_forward_float64(name, bidirectional):
    model = make_model(name, bidirectional)
    arrays = tensors(packed_batch())
    with torch.no_grad():
        full = run(model, arrays)
    for row, where, n_prefix in _examples(arrays):
        ids = arrays["input_ids"][row, where]
        prefix_logits, state = model.prefill(ids[None, :n_prefix])
        torch.testing.assert_close(prefix_logits[0], full[row, where[:n_prefix]], rtol=0, atol=1e-10)
        assert state.position == n_prefix
        for t in range(n_prefix, len(where)):
            logits, state = model.step(ids[t : t + 1], state)
            torch.testing.assert_close(logits[0], full[row, where[t]], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", RECURRENT)
def test_decoding_in_float32_within_1e_4(name):
    model = make_model(name, True, dtype=torch.float32)
    arrays = tensors(packed_batch())
    with torch.no_grad():
        full = run(model, arrays)
    row, where, n_prefix = next(iter(_examples(arrays)))
    ids = arrays["input_ids"][row, where]
    _, state = model.prefill(ids[None, :n_prefix])
    for t in range(n_prefix, len(where)):
        logits, state = model.step(ids[t : t + 1], state)
        torch.testing.assert_close(logits[0], full[row, where[t]], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", RECURRENT)
def test_batched_decoding_of_two_examples_at_different_offsets(name):
    # Two rows, each holding a (5, 6) example after a different-length first example.
    batch = packed_batch(layout=[[(3, 2), (5, 6)], [(4, 6), (5, 6)]], seq_len=24, seed=5)
    arrays = tensors(batch)
    model = make_model(name, True)
    with torch.no_grad():
        full = run(model, arrays)
    starts = [5, 10]
    ids = torch.stack([arrays["input_ids"][r, s : s + 11] for r, s in enumerate(starts)])
    _, state = model.prefill(ids[:, :5])
    for t in range(5, 11):
        logits, state = model.step(ids[:, t], state)
        for r, s in enumerate(starts):
            torch.testing.assert_close(logits[r], full[r, s + t], rtol=0, atol=1e-10)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", RECURRENT)
def test_stepping_from_the_empty_state_equals_a_causal_forward(name, bidirectional):
    # With no prefix every token is suffix: the first step must reset like an example start.
    model = make_model(name, bidirectional)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids, torch.full_like(ids, 3))
    state = model.init_state(2)
    for t in range(9):
        logits, state = model.step(ids[:, t], state)
        torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", RECURRENT)
def test_step_leaves_its_input_state_alone(name):
    model = make_model(name, True)
    _, state = model.prefill(torch.tensor([[5, 6, 7, 8]]))
    first, _ = model.step(torch.tensor([9]), state)
    again, _ = model.step(torch.tensor([9]), state)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="token_ids"):
        model.step(torch.tensor([9, 9]), state)
    with pytest.raises(ValueError, match="prefix_ids"):
        model.prefill(torch.zeros(1, 0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Size, cost, factory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c[0] for c in MODEL_CASES])
def test_bidirectional_variant_has_the_same_parameters_and_flops(name):
    causal, bidirectional = make_model(name, False), make_model(name, True)
    assert causal.num_params() == bidirectional.num_params()
    assert [p.shape for p in causal.parameters()] == [p.shape for p in bidirectional.parameters()]
    assert causal.flops_per_token(512) == bidirectional.flops_per_token(512)
    # a tied head counts once: the embedding is the only vocab-sized matrix
    assert causal.num_params() - causal.num_params(non_embedding=True) == VOCAB * 16


def test_a_125m_hawk_is_definable():
    with torch.device("meta"):
        model = build_model("hawk", vocab_size=32768, d_model=768, n_layers=12, bidirectional=True)
    # per layer: in/out projections 3 d^2, RG-LRU gates 2 d^2 + 2 d, Lambda, conv 5 d, MLP 3 * 768 * 2048, 2 norms
    d = 768
    per_layer = 3 * d * d + (2 * d * d + 2 * d) + d + 5 * d + 3 * d * 2048 + 2 * d
    assert model.num_params() == 12 * per_layer + 32768 * d + d
    assert 110e6 < model.num_params() < 130e6
    # training FLOPs: 6 per matmul weight per token, plus conv and scan
    matmul_weights = 12 * (3 * d * d + 2 * d * d + 3 * d * 2048) + 32768 * d
    assert model.flops_per_token(2048) == pytest.approx(6 * matmul_weights + 3 * 12 * (8 * d + 2 * d))


def test_transformer_flops_count_attention():
    model = make_model("transformer", True)
    assert model.flops_per_token(1024) - model.flops_per_token(512) == pytest.approx(3 * 3 * 4 * 512 * 16)


def test_build_model_refuses_bad_configs():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("mamba")
    with pytest.raises(ValueError, match="no config field"):
        build_model("hawk", n_heads=4)
    with pytest.raises(ValueError, match="even"):
        model_config("hawk", d_model=15, bidirectional=True)
    with pytest.raises(ValueError, match="heads"):
        model_config("transformer", d_model=16, n_heads=3)
    assert model_config("gated_ssm", d_model=8).width == 8


# ---------------------------------------------------------------------------------------------
# Training signal
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c[0] for c in MODEL_CASES])
def test_gradients_reach_every_parameter_and_the_loss_falls(name):
    model = make_model(name, True, dtype=torch.float32, d_model=32).train()
    arrays = tensors(packed_batch())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(60):
        loss = lm_loss(run(model, arrays), arrays["label_ids"])
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for pname, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), pname
                assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.1)
    assert losses[-1] < 0.3 * losses[0], losses[::10]


@pytest.mark.parametrize("saturated", ["a_is_1", "a_is_0"])
@pytest.mark.parametrize("name", RECURRENT)
def test_gradients_stay_finite_where_the_gates_saturate(name, saturated):
    """float32, every gate pushed to where sigmoid returns exactly 0 or 1: Hawk's a = 1 exactly
    (r = 0) puts sqrt(1 - a^2) at 0, whose derivative is infinite; a = 0 is the segment cut's
    value everywhere. No gradient may be NaN or infinite."""
    model = make_model(name, True, dtype=torch.float32).train()
    with torch.no_grad():
        for block in model.blocks:
            if name == "hawk":
                lru = block.mixer.rg_lru
                if saturated == "a_is_1":
                    lru.gates.bias[: lru.width] = -200.0  # r = 0: a = sigmoid(Lambda)^0 = 1
                else:
                    lru.decay.fill_(-200.0)  # sigmoid(Lambda) = 0
            else:
                layer = block.mixer
                layer.gates.bias[layer.width :] = 200.0 if saturated == "a_is_1" else -200.0  # f = 1 or 0
    arrays = tensors(packed_batch())
    loss = lm_loss(run(model, arrays), arrays["label_ids"])
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_loss_ignores_unlabelled_positions():
    logits = torch.randn(1, 4, VOCAB)
    labels = torch.tensor([[-100, 5, -100, 7]])
    expected = F.cross_entropy(logits[0, [1, 3]], torch.tensor([5, 7]))
    torch.testing.assert_close(lm_loss(logits, labels), expected)


# ---------------------------------------------------------------------------------------------
# On a CUDA device (skip cleanly without one; run them on a GPU machine with `-m gpu`)
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", [c[0] for c in MODEL_CASES])
def test_cuda_forward_and_masking_equal_the_cpu_in_float64(name):
    """The CUDA scan kernels and the model code on the GPU compute what the CPU computes, and
    the masking-by-perturbation contract holds there too."""
    model = make_model(name, True)
    arrays = tensors(packed_batch())
    with torch.no_grad():
        expected = run(model, arrays)
        model.cuda()
        on_gpu = {k: v.cuda() for k, v in arrays.items()}
        torch.testing.assert_close(run(model, on_gpu).cpu(), expected, rtol=0, atol=1e-10)
        for row in range(2):
            for position in range(SEQ_LEN):
                changed = _changed_positions(model, on_gpu, row, position).cpu()
                assert torch.equal(changed, _expected_changes(arrays, row, position, True)), (row, position)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", [c[0] for c in MODEL_CASES])
def test_cuda_bf16_autocast_tracks_float32_and_learns(name):
    """Under bf16 autocast (the trainer's GPU setting) the logits stay close to float32, the
    weights and their gradients stay float32 and finite, and AdamW steps fit a fixed batch."""
    from trainer.evaluate import forward_logits, token_losses

    torch.manual_seed(0)
    extra = dict(MODEL_CASES)[name]
    model = build_model(name, **{**TINY, **extra, "d_model": 64}, bidirectional=True).cuda()
    arrays = {k: v.long().cuda() for k, v in tensors(packed_batch()).items()}
    with torch.no_grad():
        exact = run(model, arrays).float()
        mixed = forward_logits(model, arrays)
    assert mixed.dtype == torch.bfloat16
    assert (mixed.float() - exact).norm() / exact.norm() < 3e-2

    labels = arrays["label_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = token_losses(forward_logits(model, arrays), labels).sum() / (labels != IGNORE_INDEX).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses
