"""Small CUDA calls of every kernel, for `compute-sanitizer --tool memcheck` (benchmarks/gpu_check.sh):
the tensor-core and the one-warp-per-row attention (forward and backward, every kind, tile-edge
sizes), both decode kernels, the fused Gumbel-softmax and skinny_linear. Prints "ok" when every call ran; the sanitizer judges the
memory accesses."""

import torch

from dalle_fast import ops
from dalle_fast.sampler import key_offsets


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    with ops.backend("cuda"):
        for dtype, D in ((torch.bfloat16, 64), (torch.float16, 32), (torch.bfloat16, 128), (torch.float32, 40)):
            for T, S in ((1, 1), (5, 3), (63, 1), (64, 8), (17, 11)):
                for kind in ops.KINDS:
                    q, k, v = (torch.randn(2, 2, T + S * S, D, generator=gen).to("cuda", dtype).requires_grad_()
                               for _ in range(3))
                    out = ops.sparse_attention(q, k, v, kind, T, S, 3)
                    out.backward(torch.randn_like(out))
        for kind in ops.KINDS:  # both decode kernels (D=64: the fast one) at the first, a middle and the last position
            for D in (40, 64):
                q, k, v = (torch.randn(2, 3, *shape, generator=gen).to("cuda", torch.bfloat16)
                           for shape in ((D,), (7 + 25, D), (7 + 25, D)))
                for g in (0, 12, 24):
                    ops.sparse_decode(q, k, v, key_offsets(kind, 5, 3).cuda(), torch.tensor(g, device="cuda"), 7)
                    # the same kernels writing this step's key and value (views of one qkv row) first
                    _, k_new, v_new = torch.randn(2, 3, 3, D, generator=gen).to("cuda", torch.bfloat16).unbind(1)
                    ops.sparse_decode(q, k, v, key_offsets(kind, 5, 3).cuda(), torch.tensor(g, device="cuda"), 7,
                                      k_new=k_new, v_new=v_new)
            # the fast kernel's loop over key groups (256 keys per group at D = 128)
            q, k, v = (torch.randn(2, 3, *shape, generator=gen).to("cuda", torch.bfloat16)
                       for shape in ((128,), (300 + 25, 128), (300 + 25, 128)))
            ops.sparse_decode(q, k, v, key_offsets(kind, 5, 3).cuda(), torch.tensor(24, device="cuda"), 300)
        # ~6100 keys: dynamic and static shared memory together just past the default 48 KiB
        q, k, v = (torch.randn(1, 2, *shape, generator=gen).to("cuda", torch.bfloat16)
                   for shape in ((128,), (6135 + 9, 128), (6135 + 9, 128)))
        ops.sparse_decode(q, k, v, key_offsets("causal", 3, 3).cuda(), torch.tensor(4, device="cuda"), 6135)
        # Gumbel: the one-read cluster kernels (one block per cluster; 8 blocks with a short last
        # one and 33 positions, a partial tile; 12 blocks, a non-portable cluster where the device
        # keeps enough of them) and the two-sweep kernels (hard, contiguous vocabulary).
        # (1, 8192, 40): whole blocks, a full tile then a partial one (both tile paths).
        for shape in ((2, 37, 5, 3), (1, 8190, 33), (1, 8192, 40), (2, 5000, 3, 3), (1, 12003, 2, 3)):
            logits = torch.randn(*shape, device="cuda", requires_grad=True)
            y, kl = ops.gumbel_softmax_kl(logits, 0.7)
            (y.sum() + kl.sum()).backward()
            ops.gumbel_softmax(logits.detach().bfloat16(), 1.0)
            ops.gumbel_softmax(logits.detach().bfloat16(), 1.0, hard=True)
            ops.gumbel_softmax(logits.detach().transpose(1, -1), 1.0, dim=-1)
            ops.gumbel_argmax(logits.detach().bfloat16(), 1, 2.0)
        ops.gumbel_argmax(torch.randn(16, 8192, device="cuda").bfloat16(), -1, 1.0)  # the sampler's draw
        # skinny_linear: 1 to 4 row tiles with a short last one, k in one and in many batches of
        # blocks, rows of x a view with a longer stride; layer norm, bias, GELU and residual.
        for m, k, n in ((1, 32, 8), (17, 96, 24), (33, 2048, 16), (64, 512, 40)):
            x = torch.randn(m, k + 8, generator=gen).to("cuda", torch.bfloat16)[:, :k]
            w, b, r = (torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16) for shape in ((n, k), (n,), (m, n)))
            norm = torch.nn.LayerNorm(k).to("cuda", torch.bfloat16)
            ops.skinny_linear(x, w, b, r, "gelu", norm)
            ops.skinny_linear(x.half(), w.half())
    torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
