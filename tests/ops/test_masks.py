"""The masks, three ways: SPEC.md read literally, dalle_fast/ops/masks.py, and csrc/masks.h."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast.ops import KINDS, attention_mask, layer_kinds, mask_density
from dalle_fast.ops._backend import _C
from tests.conftest import requires_kernels


def spec_mask(kind: str, T: int, S: int, kernel: int) -> torch.Tensor:
    """SPEC.md section 2 transcribed literally, loops and all."""
    n, h = T + S * S, kernel // 2
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for key in range(q + 1):
            if q < T or key < T:
                ok = True
            else:
                g, gk = q - T, key - T
                if kind == "row":
                    ok = g - S <= gk <= g
                elif kind == "column":
                    ok = gk % S == g % S
                elif kind == "causal":
                    ok = True
                else:
                    ok = any(gk == g + S * dr + dc for dr in range(-h, 1) for dc in range(-h, h + 1))
            m[q, key] = ok
    return m


mask_args = st.tuples(st.sampled_from(KINDS), st.integers(1, 6), st.integers(1, 7), st.sampled_from([1, 3, 5, 7, 11]))


@given(mask_args)
def test_python_mask_matches_spec(args):
    kind, T, S, k = args
    assert torch.equal(attention_mask(kind, T, S, k), spec_mask(kind, T, S, k))


@requires_kernels
@given(mask_args, st.sampled_from(["predicate", "key_runs", "query_runs"]))
def test_cpp_mask_matches_python(args, source):
    kind, T, S, k = args
    expected = attention_mask(kind, T, S, k)
    raw = _C.mask_bytes(kind, T, S, k, source)
    got = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(expected.shape).bool()
    assert torch.equal(got, expected), (kind, T, S, k, source)


def test_paper_masks_key_counts_and_densities():
    T, S = 256, 32
    conv = attention_mask("conv", T, S, 11)
    image_keys = conv[T:, T:].sum(-1)
    assert image_keys.max().item() == 61  # h*k + h + 1
    row = attention_mask("row", T, S)
    assert row[T:, T:].sum(-1).max().item() == S + 1
    assert bool(row[T:, :T].all())  # every image query sees all text
    for kind, density in (("row", 0.200), ("column", 0.190), ("conv", 0.215), ("causal", 0.500)):
        assert mask_density(kind, T, S) == pytest.approx(density, abs=0.0015)


def test_every_query_sees_itself():
    for kind in KINDS:
        assert bool(attention_mask(kind, 3, 4, 3).diagonal().all())


def test_layer_schedule():
    assert layer_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert layer_kinds(1) == ["conv"]
    with pytest.raises(ValueError, match="num_layers"):
        layer_kinds(0)


@pytest.mark.parametrize("args, message", [
    (("diagonal", 4, 4, 11), "unknown attention kind"),
    (("row", 0, 4, 11), "text_len"),
    (("row", 4, 0, 11), "grid"),
    (("conv", 4, 4, 4), "odd"),
    (("conv", 4, 4, -1), "odd"),
    (("row", 4.0, 4, 11), "text_len must be an int"),
])
def test_bad_mask_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        attention_mask(*args)


@requires_kernels
@pytest.mark.parametrize("kernel", [9, 2**40 + 1, 2**62 + 1, 2**63 - 1])
def test_a_conv_kernel_past_the_grid_is_the_causal_mask_up_to_int64s_limit(kernel):
    """From kernel // 2 = S on, conv allows every earlier image key. A kernel near 2**63 overflowed
    grid * a + half in C++ (wrong attention) and the Python mask allocated kernel / 2 intervals."""
    from dalle_fast import ops

    T, S = 3, 4
    causal = attention_mask("causal", T, S)
    assert torch.equal(attention_mask("conv", T, S, kernel), causal)
    for source in ("predicate", "key_runs", "query_runs"):
        raw = _C.mask_bytes("conv", T, S, kernel, source)
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(causal.shape).bool(), causal)
    q, k, v = (torch.randn(1, 2, T + S * S, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    torch.testing.assert_close(ops.sparse_attention(q, k, v, "conv", T, S, kernel),
                               ops.sparse_attention(q, k, v, "causal", T, S, kernel))
