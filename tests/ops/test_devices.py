"""Every compiled op refuses inputs on two devices, the meta device among them.

A call with any meta input goes to the op's fake function instead of its C++ checks; the fakes
check the devices too (a mix of meta and CPU tensors returned uninitialised CPU memory)."""

import pytest
import torch

from tests.conftest import requires_kernels

pytestmark = requires_kernels


def _calls():
    ops = torch.ops.dalle_fast
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    out, lse = ops.sparse_attention_fwd(q, k, v, "row", 3, 3, 3, 0.5)
    qd, kn, vn = (torch.randn(2, 2, 8) for _ in range(3))
    ck, cv = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    offsets, g = torch.tensor([0, 1]), torch.tensor(4)
    x, w, b, r = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8), torch.randn(4, 8)
    logits = torch.randn(2, 5, 3)
    y, _, state = ops.gumbel_softmax_fwd(logits, 1.0, 1, False, False, None)
    return [
        ("sparse_attention_fwd", lambda m: ops.sparse_attention_fwd(q, m(k), v, "row", 3, 3, 3, 0.5)),
        ("sparse_attention_bwd", lambda m: ops.sparse_attention_bwd(q, q, k, v, out, m(lse), "row", 3, 3, 3, 0.5)),
        ("sparse_decode", lambda m: ops.sparse_decode(qd, ck, cv, offsets, m(g), 3, 0.3)),
        ("sparse_decode_append", lambda m: ops.sparse_decode_append(qd, kn, vn, ck, m(cv), offsets, g, 3, 0.3)),
        ("skinny_linear", lambda m: ops.skinny_linear(x, m(w), b, r, 0, None, None, 1e-5)),
        ("gumbel_softmax_bwd", lambda m: ops.gumbel_softmax_bwd(y, None, logits, y, m(state), 1.0, 1, False)),
        ("gumbel_noise", lambda m: ops.gumbel_noise(logits, m(state), 1)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_a_meta_input_beside_cpu_ones_is_refused(index):
    name, call = _calls()[index]
    call(lambda t: t)  # on one device: fine
    with pytest.raises(ValueError, match=f"{name}: the tensors must be on one device"):
        call(lambda t: t.to("meta"))


def test_a_zero_dim_residual_gets_the_ops_own_message():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"residual must be \[M, N\]"):
        torch.ops.dalle_fast.skinny_linear(x, w, None, torch.tensor(1.0), 0, None, None, 1e-5)
