"""RaggedAttention's short-row CUDA kernel (cliptune_ort/native/short_attention.cu), checked without a GPU.

The kernel's correctness rests on index algebra: which lane holds which element of each mma.sync m16n8k16
fragment, which shared-memory rows each lane hands ldmatrix (plain for Q and K, transposed for V), the reuse
of S's accumulator fragments as P's A fragments, the shared-memory pitch, the masking of keys past a row's end
and the quad reductions of the softmax. This file replays the kernel warp by warp in numpy, line for line (same
names, same loops), with ``mma`` and ``ldmatrix`` implementing the PTX ISA's layouts ("Matrix Fragments for
mma.m16n8k16 with floating point type", "ldmatrix"), and compares the result with plain attention
for rows of 1 to 128 tokens. A change to the kernel's indexing must be mirrored here; the GPU benchmark
(benchmarks/gpu.py) then checks the compiled kernel against PyTorch on the card.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

KERNEL = Path(__file__).resolve().parents[1] / "cliptune_ort" / "native" / "short_attention.cu"
HEAD, MAX_SEQ, WARPS = 64, 128, 4
PIPE_WARPS = MAX_SEQ // 16  # the pipelined kernel: one warp per 16-query tile
PITCH = HEAD + 8
LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3  # mma fragment coordinates of each lane
LR, LM = LANES & 7, LANES >> 3  # ldmatrix: lane l addresses row l % 8 of matrix l / 8


def test_constants_match_the_kernel():
    src = KERNEL.read_text()
    got = {name: int(v) for name, v in re.findall(r"constexpr int (k\w+) = (\d+);", src)}
    assert got == {"kHead": HEAD, "kMaxSeq": MAX_SEQ, "kWarps": WARPS, "kDevices": 64}
    assert "constexpr int kPitch = kHead + 8;" in src
    assert "constexpr int kPipeWarps = kMaxSeq / 16;" in src


def ldmatrix(smem, row, col, trans=False):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 with lane l addressing smem[row[l], col[l]:col[l] + 8]
    (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): matrix i is the 8 rows addressed by lanes 8i ..
    8i + 7; register i of lane l holds row l / 4, columns 2 (l % 4) and + 1 of matrix i, or with .trans rows
    2 (l % 4) and + 1 of column l / 4 (lower index in the lower half). Addresses must be 16-byte aligned."""
    assert np.all((row * PITCH + col) % 8 == 0)
    regs = []
    for i in range(4):
        m = np.stack([smem[row[8 * i + r], col[8 * i + r]:col[8 * i + r] + 8] for r in range(8)])
        if trans:
            m = m.T
        regs.append(np.stack([m[G, 2 * T], m[G, 2 * T + 1]], axis=-1))
    return regs


def pack(lo, hi):
    return np.stack([lo.astype(np.float16), hi.astype(np.float16)], axis=-1)


def mma(c, a, b0, b1):
    """c[32, 4] += A (16 x 16) B (16 x 8) from the lanes' registers, fp32 accumulation (PTX m16n8k16 layouts):
    A regs {(g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)}, B regs {(2t, g), (2t + 8, g)},
    C {(g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)}; each register two halves (columns or rows e = 0, 1)."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    C = np.zeros((16, 8), np.float32)
    for e in range(2):
        A[G, 2 * T + e] = a[0][:, e]
        A[G + 8, 2 * T + e] = a[1][:, e]
        A[G, 2 * T + 8 + e] = a[2][:, e]
        A[G + 8, 2 * T + 8 + e] = a[3][:, e]
        B[2 * T + e, G] = b0[:, e]
        B[2 * T + 8 + e, G] = b1[:, e]
        C[G, 2 * T + e] = c[:, e]
        C[G + 8, 2 * T + e] = c[:, 2 + e]
    D = A @ B + C
    out = np.empty_like(c)
    for e in range(2):
        out[:, e] = D[G, 2 * T + e]
        out[:, 2 + e] = D[G + 8, 2 * T + e]
    return out


def quad_reduce(x, op):
    """__shfl_xor_sync over lane masks 1 and 2: each lane ends with op over its quad (the 4 lanes of a g)."""
    for m in (1, 2):
        x = op(x, x[LANES ^ m])
    return x


def load_item(stage, q, k, v, base_tokens, n, head, cap, token_rows=None):
    """The cp.async loop (each 16-byte chunk) of a (row, head) into ``stage`` = [qs, ks, vs], each [cap, PITCH]:
    rows 0 .. npad - 1, those from n on zero-filled; nothing for an empty row or one over cap. Token t reads row
    InRow(token_rows, t) of q, k and v: token_rows[t], or t without a map."""
    if n <= 0 or n > cap:
        return
    npad = (n + 15) & ~15
    for i in range(npad * 8):
        r, c = i >> 3, (i & 7) * 8
        t = base_tokens + (r if r < n else 0)
        src_row = int(token_rows[t]) if token_rows is not None else t
        for dst, src in zip(stage, (q, k, v)):
            dst[r, c:c + 8] = src[src_row, head * HEAD + c:head * HEAD + c + 8] if r < n else 0


def fresh_stage(cap):
    return [np.full((cap, PITCH), np.nan, np.float16) for _ in range(3)]  # unwritten smem: NaN


def tile(qs, ks, vs, qt, n, npad, scale_log2, out, mutant=None):
    """One warp's 16-query tile qt: TileScores (S = Q K^T, the softmax's numerators and row sums) then TileOutput
    (O = P V / l through the tile's rows of qs, then whole rows < n into ``out``)."""
    qr, qc = (LM >> 1, LM & 1) if mutant == "q_matrix_order" else (LM & 1, LM >> 1)
    qa = [ldmatrix(qs, qt * 16 + LR + 8 * qr, kk * 16 + 8 * qc) for kk in range(4)]
    s = [np.zeros((32, 4), np.float32) for _ in range(16)]
    for nb in range(16):
        if nb * 8 < npad:
            for kp in range(2):
                kb = ldmatrix(ks, nb * 8 + LR, kp * 32 + 8 * LM)
                if mutant == "k_register_order":
                    kb = [kb[0], kb[2], kb[1], kb[3]]
                s[nb] = mma(s[nb], qa[2 * kp], kb[0], kb[1])
                s[nb] = mma(s[nb], qa[2 * kp + 1], kb[2], kb[3])
    m0 = np.full(32, -np.inf, np.float32)
    m1 = np.full(32, -np.inf, np.float32)
    for nb in range(16):
        for e in range(2):
            key = nb * 8 + 2 * T + e < n
            s[nb][:, e] = np.where(key, s[nb][:, e] * scale_log2, -np.inf)
            s[nb][:, 2 + e] = np.where(key, s[nb][:, 2 + e] * scale_log2, -np.inf)
            m0 = np.fmax(m0, s[nb][:, e])
            m1 = np.fmax(m1, s[nb][:, 2 + e])
    m0, m1 = quad_reduce(m0, np.fmax), quad_reduce(m1, np.fmax)
    l0 = np.zeros(32, np.float32)
    l1 = np.zeros(32, np.float32)
    for nb in range(16):
        for e in range(2):
            s[nb][:, e] = np.exp2(s[nb][:, e] - m0)
            s[nb][:, 2 + e] = np.exp2(s[nb][:, 2 + e] - m1)
            l0 += s[nb][:, e]
            l1 += s[nb][:, 2 + e]
    l0, l1 = quad_reduce(l0, np.add), quad_reduce(l1, np.add)
    acc = [np.zeros((32, 4), np.float32) for _ in range(8)]
    for j in range(8):
        if j * 16 < npad:
            pa = [pack(s[2 * j][:, 0], s[2 * j][:, 1]), pack(s[2 * j][:, 2], s[2 * j][:, 3]),
                  pack(s[2 * j + 1][:, 0], s[2 * j + 1][:, 1]), pack(s[2 * j + 1][:, 2], s[2 * j + 1][:, 3])]
            for dp in range(4):
                vb = ldmatrix(vs, j * 16 + LR + 8 * (LM & 1), dp * 16 + 8 * (LM >> 1),
                              trans=mutant != "v_not_transposed")
                acc[2 * dp] = mma(acc[2 * dp], pa, vb[0], vb[1])
                acc[2 * dp + 1] = mma(acc[2 * dp + 1], pa, vb[2], vb[3])
    r0, r1 = 1.0 / l0, 1.0 / l1
    orow = qt * 16 + G
    for db in range(8):  # through this tile's rows of qs, then whole rows out (rows < n)
        qs[orow, db * 8 + 2 * T] = (acc[db][:, 0] * r0).astype(np.float16)
        qs[orow, db * 8 + 2 * T + 1] = (acc[db][:, 1] * r0).astype(np.float16)
        qs[orow + 8, db * 8 + 2 * T] = (acc[db][:, 2] * r1).astype(np.float16)
        qs[orow + 8, db * 8 + 2 * T + 1] = (acc[db][:, 3] * r1).astype(np.float16)
    for i in range(16 * 8):
        r, c = qt * 16 + (i >> 3), (i & 7) * 8
        if r < n:
            out[r, c:c + 8] = qs[r, c:c + 8]


def kernel_block(q, k, v, base_tokens, n, hidden, head, cap, scale, mutant=None):
    """One block (row, head) of ShortAttentionKernel; returns O rows [n, 64] as the kernel stores them. q, k, v:
    [tokens, in_ld] views whose column 0 is the kernel's q, k, v pointer (in_ld = hidden, or 3 hidden for one QKV
    tensor); base_tokens = ragged[row] / hidden. ``mutant`` replays one deliberate indexing error instead."""
    scale_log2 = np.float32(scale * 1.4426950408889634)
    npad = (n + 15) & ~15
    assert n <= cap
    qs, ks, vs = stage = fresh_stage(cap)
    load_item(stage, q, k, v, base_tokens, n, head, cap)
    out = np.full((npad, HEAD), np.nan, np.float16)
    for warp in range(WARPS):
        for qt in range(warp, npad >> 4, WARPS):  # the kernel's passes: qt = warp + pass * kWarps while qt < tiles
            tile(qs, ks, vs, qt, n, npad, scale_log2, out, mutant)
    return out[:n]


def pipe_block(q, k, v, start, lens, heads, cap, scale, block, grid, mutant=None, token_rows=None):
    """One block of PipeAttentionKernel, replayed in the kernel's order: items block, block + grid, ... (row =
    item / heads, head = item % heads); before the loop the first item's loads into stage 0, then in each pass the
    next item's loads into the other stage, this item's tiles from its stage (one warp per tile), and the stages
    swap. The two stages persist across items (stale rows of earlier, longer items stay in them). Returns {(row,
    head): O rows [n, 64]}. ``mutant="same_stage"`` loads the next item into the stage being computed."""
    scale_log2 = np.float32(scale * 1.4426950408889634)
    items = len(lens) * heads
    stages = [fresh_stage(cap), fresh_stage(cap)]

    def item_at(item):
        row, head = item // heads, item % heads
        return row, head, lens[row], start[row]

    got = {}
    item = block
    cur = item_at(item)
    load_item(stages[0], q, k, v, cur[3], cur[2], cur[1], cap, token_rows)
    at = 0
    while item < items:
        nxt = item + grid
        nxt_item = item_at(nxt) if nxt < items else None
        if nxt_item is not None:
            dst = stages[at] if mutant == "same_stage" else stages[at ^ 1]
            load_item(dst, q, k, v, nxt_item[3], nxt_item[2], nxt_item[1], cap, token_rows)
        qs, ks, vs = stages[at]
        row, head, n, _ = cur
        if 0 < n <= cap:
            npad = (n + 15) & ~15
            out = np.full((npad, HEAD), np.nan, np.float16)
            for warp in range(PIPE_WARPS):
                if warp < npad >> 4:
                    tile(qs, ks, vs, warp, n, npad, scale_log2, out)
            assert (row, head) not in got
            got[(row, head)] = out[:n]
        cur, at, item = nxt_item, at ^ 1, nxt
    return got


def attention(q, k, v, scale):
    s = (q.astype(np.float32) @ k.astype(np.float32).T) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v.astype(np.float32)


def long_kernel_thread(q, k, v, base_tokens, n, head, i, scale):
    """One thread (query i of a row, one head) of LongAttentionKernel: online softmax over the row's keys."""
    scale_log2 = np.float32(scale * 1.4426950408889634)
    cols = slice(head * HEAD, (head + 1) * HEAD)
    qv = q[base_tokens + i, cols].astype(np.float32) * scale_log2
    acc = np.zeros(HEAD, np.float32)
    m, l_sum = np.float32(-np.inf), np.float32(0)
    for j in range(n):
        sc = np.float32(qv @ k[base_tokens + j, cols].astype(np.float32))
        if sc > m:  # a new maximum: rescale what was summed
            r = np.exp2(m - sc)
            l_sum *= r
            acc *= r
            m = sc
        p_j = np.exp2(sc - m)
        l_sum += p_j
        acc += p_j * v[base_tokens + j, cols].astype(np.float32)
    return (acc / l_sum).astype(np.float16)


def _case(lens, qkv):
    """q, k, v views ([tokens, in_ld], column 0 at each part) of random fp16 data, as the launcher passes them."""
    rng = np.random.default_rng(sum(lens))
    heads = 2
    hidden = heads * HEAD
    tokens = sum(lens)
    if qkv:  # one [tokens, 3 hidden] tensor: views at columns 0, hidden and 2 hidden
        packed = rng.standard_normal((tokens, 3 * hidden)).astype(np.float16)
        q, k, v = packed[:, :hidden], packed[:, hidden:2 * hidden], packed[:, 2 * hidden:]
    else:
        q, k, v = (rng.standard_normal((tokens, hidden)).astype(np.float16) for _ in range(3))
    return heads, hidden, q, k, v, np.concatenate([[0], np.cumsum(lens)])


@pytest.mark.parametrize("qkv", [False, True])
@pytest.mark.parametrize("lens", [[1, 16, 17, 71], [106, 59, 128], [33, 2, 64, 65, 112]])
def test_kernel_replay_matches_attention(lens, qkv):
    """Each (row, head) block of the kernel, replayed, equals softmax(Q K^T scale) V of that row within fp16
    rounding, for rows of 1 to 128 tokens (tile edges 16/17, 64/65, the 112-token smem bound, the maximum),
    with separate Q, K, V and with one QKV tensor."""
    heads, hidden, q, k, v, start = _case(lens, qkv)
    scale = 1.0 / np.sqrt(HEAD)
    cap = (max(lens) + 15) & ~15  # the launcher's: the call's longest row rounded up to 16
    for r, n in enumerate(lens):
        for h in range(heads):
            got = kernel_block(q, k, v, start[r], n, hidden, h, cap, scale)
            cols = slice(h * HEAD, (h + 1) * HEAD)
            want = attention(q[start[r]:start[r] + n, cols], k[start[r]:start[r] + n, cols],
                             v[start[r]:start[r] + n, cols], scale)
            assert np.isfinite(got).all(), (n, h)
            np.testing.assert_allclose(got.astype(np.float32), want, atol=4e-3, rtol=0)


@pytest.mark.parametrize("mutant", ["q_matrix_order", "k_register_order", "v_not_transposed"])
def test_replay_catches_fragment_layout_errors(mutant):
    """The replay is sensitive to the ldmatrix layouts: each of three plausible indexing slips (Q's matrices
    in the wrong order, K's registers paired wrongly, V loaded without .trans) gives wrong attention."""
    lens = [71, 33]
    _heads, hidden, q, k, v, start = _case(lens, False)
    scale = 1.0 / np.sqrt(HEAD)
    got = kernel_block(q, k, v, start[0], lens[0], hidden, 1, 80, scale, mutant=mutant)
    cols = slice(HEAD, 2 * HEAD)
    want = attention(q[:lens[0], cols], k[:lens[0], cols], v[:lens[0], cols], scale)
    assert np.max(np.abs(got.astype(np.float32) - want)) > 0.05


def test_block_order_covers_every_row_and_head():
    """The launch is one-dimensional, heads fastest (row = block / heads, head = block % heads): every
    (row, head) exactly once, and neighbouring blocks share a row."""
    src = KERNEL.read_text()
    assert "const int row = static_cast<int>(blockIdx.x / heads), head = static_cast<int>(blockIdx.x % heads);" in src
    assert "const int items = rows * heads;" in src and "ShortAttentionKernel<<<static_cast<unsigned>(items)," in src
    rows, heads = 7, 16
    pairs = [(b // heads, b % heads) for b in range(rows * heads)]
    assert sorted(pairs) == [(r, h) for r in range(rows) for h in range(heads)]
    assert all(pairs[b][0] == pairs[b + 1][0] for b in range(heads - 1))


@pytest.mark.parametrize("qkv", [False, True])
def test_long_row_kernel_replay_matches_attention(qkv):
    """Rows over 128 tokens (a call whose longest row is longer runs LongAttentionKernel): each thread's online
    softmax, replayed, equals plain attention; a short row in the same call too."""
    lens = [150, 3]
    heads, _hidden, q, k, v, start = _case(lens, qkv)
    scale = 1.0 / np.sqrt(HEAD)
    for r, n in enumerate(lens):
        for h in (0, heads - 1):
            cols = slice(h * HEAD, (h + 1) * HEAD)
            want = attention(q[start[r]:start[r] + n, cols], k[start[r]:start[r] + n, cols],
                             v[start[r]:start[r] + n, cols], scale)
            for i in sorted({0, 1, n // 2, n - 1}):
                got = long_kernel_thread(q, k, v, start[r], n, h, i, scale)
                np.testing.assert_allclose(got.astype(np.float32), want[i], atol=2e-3, rtol=0)


def test_pipelined_kernel_source_is_what_the_replay_mirrors():
    """The lines of PipeAttentionKernel that :func:`pipe_block` replays: the item loop and its stride, the next
    item's loads into the other stage, one warp per tile reading this item's stage, the waits and barriers, and
    a grid of at most one block per item."""
    src = KERNEL.read_text()
    body = src[src.index("PipeAttentionKernel(const __half*"):src.index("// Rows over 128 tokens")]
    for line in ("for (; item < items; item += static_cast<int>(gridDim.x)) {",
                 "const int row = item / heads, head = item % heads;",
                 "LoadItem(stages, cap, cur, q, k, v, in_ld, token_rows, tid, kPipeWarps * 32);",
                 "LoadItem(stages + (at ^ 1) * stage, cap, next, q, k, v, in_ld, token_rows, tid, kPipeWarps * 32);",
                 "const int64_t at = InRow(token_rows, it.t0 + (r < it.n ? r : 0)) * in_ld + it.col + c;",
                 'asm volatile("cp.async.wait_group 1;\\n" ::);',
                 "__half* qs = stages + at * stage;",
                 "const int qt = warp;",
                 "TileScores(qs, qs + cap * kPitch, qt, cur.n, npad, scale_log2, lane, s, l0, l1);",
                 "TileOutput(qs + 2 * cap * kPitch, qs, qt, cur.n, npad, lane, s, l0, l1, o, cur.base, hidden);",
                 "cur = next;", "at ^= 1;"):
        assert line in src, line
    # after the wait, after the query bias (where there is one: q_bias is the same for the whole grid), and before
    # the stage is loaded again
    assert body.count("__syncthreads();") == 3
    assert "PipeAttentionKernel<<<static_cast<unsigned>(std::min(grid, items)), kPipeWarps * 32, bytes, stream>>>" in src
    assert "const size_t bytes = 2 * 3 * static_cast<size_t>(cap) * kPitch * sizeof(__half);" in src


@pytest.mark.parametrize("qkv", [False, True])
@pytest.mark.parametrize("grid", [1, 5, 7])
def test_pipelined_kernel_replay_matches_attention(qkv, grid):
    """Every (row, head) item, computed by the block whose loop reaches it (blocks 0 .. grid - 1, items block,
    block + grid, ...), exactly once, equals plain attention: rows of 1 to 128 tokens in an order that leaves a
    long item's rows in a stage a short one reuses, grids that give a block one to 18 items."""
    lens = [128, 3, 17, 112, 1, 64, 65, 16, 99]
    heads, _hidden, q, k, v, start = _case(lens, qkv)
    scale = 1.0 / np.sqrt(HEAD)
    cap = (max(lens) + 15) & ~15
    got = {}
    for block in range(grid):
        part = pipe_block(q, k, v, start, lens, heads, cap, scale, block, grid)
        assert not set(part) & set(got)
        got.update(part)
    assert sorted(got) == [(r, h) for r in range(len(lens)) for h in range(heads)]
    for (r, h), o in got.items():
        cols = slice(h * HEAD, (h + 1) * HEAD)
        rows = slice(start[r], start[r] + lens[r])
        assert np.isfinite(o).all(), (r, h)
        np.testing.assert_allclose(o.astype(np.float32), attention(q[rows, cols], k[rows, cols], v[rows, cols], scale),
                                   atol=4e-3, rtol=0)


def test_pipelined_replay_catches_a_stage_mixup():
    """Loading the next item into the stage being computed (one stage, not two) overwrites the item's Q, K and
    V before its tiles read them: the replay sees wrong attention."""
    lens = [40, 90, 30]
    heads, _hidden, q, k, v, start = _case(lens, False)
    scale = 1.0 / np.sqrt(HEAD)
    got = pipe_block(q, k, v, start, lens, heads, 96, scale, 0, 1, mutant="same_stage")
    cols = slice(0, HEAD)
    want = attention(q[:40, cols], k[:40, cols], v[:40, cols], scale)
    assert not np.allclose(got[(0, 0)].astype(np.float32), want, atol=0.05)


@pytest.mark.parametrize("qkv", [False, True])
def test_token_rows_replay_matches_attention(qkv):
    """token_rows (a packed first layer whose rows share a prefix): rows 1 and 2 of each pair read their first 5
    tokens from row 0's rows of a compact Q, K, V, in both kernels' loads (the load loops index q, k, v at
    InRow(token_rows, t), source-checked); the result is plain attention over the expanded rows."""
    src = KERNEL.read_text()
    assert "const int64_t at = InRow(token_rows, t0 + (r < n ? r : 0)) * in_ld + col + c;" in src  # impl 1, Q and K
    assert "v + InRow(token_rows, t0 + (r < n ? r : 0)) * in_ld + col + c" in src  # impl 1, V
    assert "return token_rows != nullptr ? static_cast<int64_t>(token_rows[t]) : t;" in src
    lens, shared = [20, 33, 7, 70, 16, 128], 5
    heads, _hidden, q, k, v, start = _case(lens, qkv)
    rows = np.arange(sum(lens), dtype=np.int32)
    for r in (1, 2, 4, 5):  # rows 1, 2 take row 0's prefix; rows 4, 5 row 3's
        first = 0 if r < 3 else 3
        rows[start[r]:start[r] + shared] = rows[start[first]:start[first] + shared]
        q[start[r]:start[r] + shared] = np.nan  # the compact tensors no longer hold these rows
        k[start[r]:start[r] + shared] = np.nan
        v[start[r]:start[r] + shared] = np.nan
    scale = 1.0 / np.sqrt(HEAD)
    cap = 128
    qe, ke, ve = q[rows], k[rows], v[rows]
    got = {}
    for block in range(4):
        got.update(pipe_block(q, k, v, start, lens, heads, cap, scale, block, 4, token_rows=rows))
    for r, n in enumerate(lens):
        for h in range(heads):
            cols = slice(h * HEAD, (h + 1) * HEAD)
            want = attention(qe[start[r]:start[r] + n, cols], ke[start[r]:start[r] + n, cols],
                             ve[start[r]:start[r] + n, cols], scale)
            np.testing.assert_allclose(got[(r, h)].astype(np.float32), want, atol=4e-3, rtol=0)
            one = np.full((128, PITCH), np.nan, np.float16)
            stage = [one, one.copy(), one.copy()]
            load_item(stage, q, k, v, start[r], n, h, cap, rows)
            assert np.isfinite(stage[0][:n, :HEAD]).all()  # no prefix row read where it was removed


def test_query_bias_is_added_to_the_stage_before_any_warp_reads_q():
    """q_bias (RaggedAttention's 8th input): both short-row kernels add it to the stage's Q rows between two
    barriers, after Q has arrived and before TileScores; the add is fp32, rounded once (as the projection's epilogue
    would), 16 bytes at a time, the head's 64 values at ``col``; the long-row kernel adds it in the same way."""
    src = KERNEL.read_text()
    body1 = src[src.index("    ShortAttentionKernel(const __half*"):src.index("// One (row, head) of the pipelined kernel")]
    body2 = src[src.index("PipeAttentionKernel(const __half*"):src.index("// Rows over 128 tokens")]
    for body, add in ((body1, "AddQueryBias(qs, q_bias, col, npad, tid, kWarps * 32);"),
                      (body2, "AddQueryBias(qs, q_bias, cur.col, (cur.n + 15) & ~15, tid, kPipeWarps * 32);")):
        wait = body.index('cp.async.wait_group 1;')
        at = body.index(add)
        assert wait < body.index("__syncthreads();", wait) < at < body.index("__syncthreads();", at) \
            < body.index("TileScores(")
    helper = src[src.index("__device__ __forceinline__ void AddQueryBias"):src.index("// A row longer than")]
    assert "__floats2half2_rn(xf.x + bf.x, xf.y + bf.y)" in helper and "q_bias + col + c" in helper
    assert "__float2half(__half2float(qi[c]) + __half2float(q_bias[col + c]))" in src  # the long-row kernel
    # the replayed rounding: fp32 sum, one fp16 rounding
    rng = np.random.default_rng(3)
    q = rng.standard_normal((5, HEAD)).astype(np.float16)
    b = rng.standard_normal(HEAD).astype(np.float16)
    once = (q.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
    assert np.array_equal(once, q + b)  # fp16 + fp16 in numpy rounds the exact sum once too
