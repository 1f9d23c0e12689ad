"""The single ops on torch tensors: quantize (rowwise, block, transposed, both), dequantize, the
scaling-aware transpose, the MXFP4 conversions.

CPU tests run the C++ reference backend and check it against independent torch computations
(the scale rule s = 2^ceil(log2(amax / fmt_max)) and torch's own RNE float8 casts; ml_dtypes for
E2M1 when installed) and against the identities the headers state. CUDA tests check every op's
CUDA result bit for bit against the CPU reference on the same tensors.
"""

import pytest

torch = pytest.importorskip("torch")
fp8flow = pytest.importorskip("fp8flow")

from util import as_bytes, has_fp8_dtypes, values  # noqa: E402

needs_fp8 = pytest.mark.skipif(not has_fp8_dtypes(), reason="torch without float8 dtypes")

FMT_MAX_EXP = {"e4m3": 8, "e5m2": 15}  # 448 = 1.75 * 2^8, 57344 = 1.75 * 2^15


def torch_fp8(fmt):
    return torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2


def fp8_table(fmt):
    """The non-negative finite values of the format, indexed by code (float64)."""
    man_bits, bias, n = (3, 7, 127) if fmt == "e4m3" else (2, 15, 124)
    c = torch.arange(n, dtype=torch.int64)
    e, m = c >> man_bits, (c & ((1 << man_bits) - 1)).double() / (1 << man_bits)
    return torch.where(e == 0, m * 2.0 ** (1 - bias), (1 + m) * torch.exp2((e - bias).double()))


def encode_fp8(q, fmt):
    """float32 values (|q| <= fmt max, finite) -> uint8 codes, round to nearest even. torch's own
    float8 cast where this torch has it (an implementation independent of fp8flow's), else a
    table search."""
    if has_fp8_dtypes():
        return q.to(torch_fp8(fmt)).view(torch.uint8)
    table = fp8_table(fmt)
    a = q.double().abs().flatten()
    hi = torch.searchsorted(table, a).clamp(max=len(table) - 1)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = (a - table[lo]).abs(), (table[hi] - a).abs()
    pick = torch.where(dlo < dhi, lo, torch.where(dhi < dlo, hi, torch.where(lo % 2 == 0, lo, hi)))
    sign = (q.flatten() < 0) | ((q.flatten() == 0) & (torch.signbit(q.flatten())))
    return (pick | (sign.to(torch.int64) << 7)).to(torch.uint8).view(q.shape)


def decode_fp8(codes, fmt):
    """uint8 codes (no NaN) -> float64 values."""
    c = codes.to(torch.int64)
    v = fp8_table(fmt)[c & 0x7F]
    return torch.where(c >= 0x80, -v, v)


def scale_exp(amax, fmt):
    """Exponent of s = 2^ceil(log2(amax / fmt_max)) from amax's bits (formats.h scale_exponent)."""
    bits = amax.float().contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    exp = (bits >> 23) - 127
    over = ((bits & 0x7FFFFF) > 0x600000).to(torch.int64)
    e = exp - FMT_MAX_EXP[fmt] + over
    e = torch.where(bits < 0x00800000, torch.full_like(e, -127), e)
    return e.clamp(-127, 127)


def tile_amax(blk, dim):
    return torch.where(torch.isfinite(blk), blk.abs(), torch.zeros_like(blk)).amax(dim=dim)


def ref_quantize_rowwise(x, fmt="e4m3"):
    """Independent torch model of 1x128 row-wise quantization: (uint8 codes, scales [tiles][M])."""
    x = x.float().cpu()
    M, K = x.shape
    codes, scales = [], []
    for k0 in range(0, K, 128):
        blk = x[:, k0:k0 + 128]
        e = scale_exp(tile_amax(blk, 1), fmt)
        codes.append(encode_fp8(blk * torch.exp2(-e.double()).float()[:, None], fmt))
        scales.append(torch.exp2(e.double()).float())
    return torch.cat(codes, dim=1), torch.stack(scales)


def ref_quantize_block(x, fmt="e4m3"):
    x = x.float().cpu()
    N, K = x.shape
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty((N + 127) // 128, (K + 127) // 128)
    for i, n0 in enumerate(range(0, N, 128)):
        for j, k0 in enumerate(range(0, K, 128)):
            blk = x[n0:n0 + 128, k0:k0 + 128]
            e = scale_exp(tile_amax(blk.reshape(1, -1), 1), fmt)
            codes[n0:n0 + 128, k0:k0 + 128] = encode_fp8(blk * torch.exp2(-e.double()).float(), fmt)
            scales[i, j] = torch.exp2(e.double()).float()
    return codes, scales


def ref_quantize_transposed(x, groups, fmt="e4m3"):
    """Column-wise copy = row-wise quantization of each group's X_g^T, concatenated along M."""
    xt = x.float().cpu().t().contiguous()
    groups = groups or [x.shape[0]]
    codes, scales, m0 = [], [], 0
    for g in groups:
        if g:
            c, s = ref_quantize_rowwise(xt[:, m0:m0 + g], fmt)
            codes.append(c)
            scales.append(s)
        m0 += g
    return torch.cat(codes, dim=1), torch.cat(scales, dim=0)


def fp8_values(codes, scales, fmt="e4m3"):
    """value = code * scale for a rowwise tensor with one group (float64)."""
    v = decode_fp8(as_bytes(codes), fmt)
    s = scales.double().repeat_interleave(128, dim=0)[: codes.shape[1]].t()
    return v * s


# ---- CPU: against independent torch models -------------------------------------------------------

@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("kind", ["normal", "wide", "adversarial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (37, 256), (130, 400)])
def test_quantize_rowwise_matches_torch_model(fmt, kind, dtype, shape):
    x = values(shape, kind, seed=shape[0], dtype=dtype)
    d, s = fp8flow.quantize(x, "rowwise", fmt)
    rd, rs = ref_quantize_rowwise(x, fmt)
    if has_fp8_dtypes():
        assert d.dtype == torch_fp8(fmt)
    assert s.dtype == torch.float32
    assert s.shape == ((shape[1] + 127) // 128, shape[0])
    assert torch.equal(as_bytes(d), rd)
    assert torch.equal(as_bytes(s), as_bytes(rs))


@pytest.mark.parametrize("shape", [(128, 128), (200, 336), (384, 256)])
def test_quantize_block_matches_torch_model(shape):
    x = values(shape, "normal", seed=3)
    d, s = fp8flow.quantize(x, "block")
    rd, rs = ref_quantize_block(x)
    assert torch.equal(as_bytes(d), rd)
    assert torch.equal(as_bytes(s), as_bytes(rs))


@pytest.mark.parametrize("groups", [None, [100, 0, 156], [256], [1, 127, 128]])
def test_quantize_transposed_and_both(groups):
    x = values((256, 384), "normal", seed=5, dtype=torch.bfloat16)
    dt, st = fp8flow.quantize_transposed(x, groups)
    rdt, rst = ref_quantize_transposed(x, groups)
    assert torch.equal(as_bytes(dt), rdt)
    assert torch.equal(as_bytes(st), as_bytes(rst))
    d, s, dt2, st2 = fp8flow.quantize_both(x, groups)
    d1, s1 = fp8flow.quantize(x)
    for a, b in ((d, d1), (s, s1), (dt2, dt), (st2, st)):
        assert torch.equal(as_bytes(a), as_bytes(b))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_code_times_scale(out_dtype):
    x = values((64, 384), "wide", seed=7)
    d, s = fp8flow.quantize(x)
    y = fp8flow.dequantize(d, s, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    assert torch.equal(y, fp8_values(d, s).to(out_dtype))


@pytest.mark.parametrize("policy", ["column_tight", "tile_max"])
@pytest.mark.parametrize("groups", [None, [40, 0, 216]])
def test_transpose_scaled_is_exact(policy, groups):
    # Rows within a few binades of each other: no element underflows, so the column-wise copy
    # holds exactly the row-wise values.
    x = values((256, 256), "normal", seed=11)
    x = x / x.abs().amax(dim=1, keepdim=True)
    d, s = fp8flow.quantize(x)
    dt, st, under = fp8flow.transpose_scaled(d, s, groups, policy)
    assert int(under) == 0
    back = fp8flow.dequantize(dt, st, "rowwise", groups, out_dtype=torch.float32)
    assert torch.equal(back.t(), fp8flow.dequantize(d, s, out_dtype=torch.float32))


def test_transpose_scaled_counts_underflow():
    x = values((128, 128), "normal", seed=12)
    x[0, :] *= 2.0**-20  # a row far below the others: its values underflow at the column scale
    d, s = fp8flow.quantize(x)
    _, _, under = fp8flow.transpose_scaled(d, s)
    assert int(under) > 0


def e2m1_model(v):
    """RNE to E2M1 (saturating at 6) as 4-bit codes: ml_dtypes' float4_e2m1fn where installed (an
    implementation independent of fp8flow's), else a table search."""
    v = v.float().clamp(-6.0, 6.0)
    try:
        import ml_dtypes
        import numpy as np

        c = v.numpy().astype(ml_dtypes.float4_e2m1fn)
        return torch.from_numpy(c.view(np.uint8).astype(np.uint8) & 0xF)
    except ImportError:
        pass
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    a = v.double().abs()
    hi = torch.searchsorted(table, a.flatten()).clamp(max=7).view(a.shape)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = (a - table[lo]).abs(), (table[hi] - a).abs()
    pick = torch.where(dlo < dhi, lo, torch.where(dhi < dlo, hi, torch.where(lo % 2 == 0, lo, hi)))
    sign = (v < 0) | ((v == 0) & torch.signbit(v))
    return (pick | (sign.to(torch.int64) << 3)).to(torch.uint8)


def test_quantize_mxfp4_matches_model():
    x = values((33, 256), "normal", seed=13)
    d, s = fp8flow.quantize_mxfp4(x)
    assert d.shape == (33, 128) and s.shape == (33, 8)
    blk = x.view(33, 8, 32)
    amax = blk.abs().amax(dim=2)
    e = (amax.view(torch.int32) >> 23) - 127 - 2  # floor(log2 amax) - 2 (all normal here)
    assert torch.equal(as_bytes(s).view(33, 8).to(torch.int64), (e + 127).to(torch.int64))
    codes = e2m1_model((blk * torch.exp2(-e.double()).float()[:, :, None]).view(33, 256))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    assert torch.equal(as_bytes(d).view(33, 128), packed)


@pytest.mark.parametrize("kind", ["normal", "adversarial"])
def test_mxfp4_identities(kind):
    # mxfp4.h: fp8_to_mxfp4(x) == quantize_mxfp4(dequantize(x)); mxfp4_to_fp8(y) ==
    # quantize(dequantize(y)); mxfp4_to_fp8_transposed(y) == quantize_transposed(dequantize(y)).
    x = values((96, 256), kind, seed=17)
    d, s = fp8flow.quantize(x)
    md, ms = fp8flow.fp8_to_mxfp4(d, s)
    md2, ms2 = fp8flow.quantize_mxfp4(fp8flow.dequantize(d, s, out_dtype=torch.float32))
    assert torch.equal(as_bytes(md), as_bytes(md2)) and torch.equal(as_bytes(ms), as_bytes(ms2))
    y = fp8flow.dequantize(md, ms, "mx", out_dtype=torch.float32)
    fd, fs = fp8flow.mxfp4_to_fp8(md, ms)
    fd2, fs2 = fp8flow.quantize(y)
    assert torch.equal(as_bytes(fd), as_bytes(fd2)) and torch.equal(as_bytes(fs), as_bytes(fs2))
    groups = [50, 46]
    td, ts = fp8flow.mxfp4_to_fp8_transposed(md, ms, groups)
    td2, ts2 = fp8flow.quantize_transposed(y, groups)
    assert torch.equal(as_bytes(td), as_bytes(td2)) and torch.equal(as_bytes(ts), as_bytes(ts2))


def test_strided_input_rows():
    # A view with row stride > cols (ld) is passed without a copy and gives the same result.
    big = values((64, 512), "normal", seed=19)
    x = big[:, :256]
    d, s = fp8flow.quantize(x)
    d2, s2 = fp8flow.quantize(x.contiguous())
    assert torch.equal(as_bytes(d), as_bytes(d2)) and torch.equal(as_bytes(s), as_bytes(s2))


# ---- errors ----------------------------------------------------------------------------------------

def test_cpp_error_message_is_unchanged():
    msg = "fp8flow::some_op: some.arg: expected this, got that"
    with pytest.raises(RuntimeError) as e:
        torch.ops.fp8flow._throw("invalid", msg)
    assert str(e.value) == msg
    with pytest.raises(fp8flow.Error) as e:
        fp8flow._errors.call(torch.ops.fp8flow._throw, "unsupported", msg)
    assert str(e.value) == msg


def test_op_errors_name_op_and_argument():
    with pytest.raises(fp8flow.Error) as e:
        fp8flow.quantize(torch.randn(4, 20))
    assert str(e.value) == "fp8flow::quantize: in: expected cols divisible by 16, got 20"
    with pytest.raises(fp8flow.Error, match=r"^fp8flow::quantize: fmt: expected 'e4m3' or 'e5m2'"):
        fp8flow.quantize(torch.randn(4, 128), fmt="e3m4")
    with pytest.raises(fp8flow.Error, match=r"^fp8flow::quantize: in: expected a 2-D tensor, got 3-D"):
        fp8flow.quantize(torch.randn(2, 4, 128))
    with pytest.raises(fp8flow.Error, match=r"^fp8flow::quantize: in\.dtype"):
        fp8flow.quantize(torch.zeros(4, 128, dtype=torch.int16))
    with pytest.raises(fp8flow.Error, match=r"^fp8flow::transpose_scaled: "):
        d, s = fp8flow.quantize(torch.randn(8, 128))
        fp8flow.transpose_scaled(d, s, [3, 3])  # groups must sum to M = 8
    with pytest.raises(fp8flow.Error, match=r"^fp8flow::quantize_mxfp4: in\.cols"):
        fp8flow.quantize_mxfp4(torch.randn(4, 48))


# ---- torch.compile ------------------------------------------------------------------------------

@needs_fp8
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch without torch.compile")
def test_ops_trace_in_a_full_graph():
    # The Meta kernels give fake-tensor shapes: the ops compile without graph breaks.
    def f(x):
        d, s = torch.ops.fp8flow.quantize(x, "rowwise", "e4m3")
        return torch.ops.fp8flow.dequantize(d, s, "rowwise", [], torch.float32) * 2

    x = values((64, 256), "normal", seed=23)
    got = torch.compile(f, backend="eager", fullgraph=True)(x)
    assert torch.equal(got, f(x))


# ---- CUDA == CPU, bit for bit ---------------------------------------------------------------------

def cuda_vs_cpu(fn, *cpu_args):
    """fn on CUDA copies of the tensor arguments vs fn on the CPU ones: every output bytewise."""
    dev_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in cpu_args]
    got = fn(*dev_args)
    want = fn(*cpu_args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.is_cuda and g.dtype == w.dtype and g.shape == w.shape, i
        assert torch.equal(as_bytes(g), as_bytes(w)), f"output {i} differs"


SHAPES = [(1, 128), (130, 256), (333, 1024), (2048, 384)]
KINDS = ["normal", "wide", "adversarial"]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_quantize_family(shape, kind, dtype):
    x = values(shape, kind, seed=29, dtype=dtype)
    if kind == "adversarial":
        x.view(-1)[::97] = float("nan")
        x.view(-1)[5::131] = float("inf")
    M = shape[0]
    groups = [M // 3, 0, M - M // 3] if M > 1 else [1]
    cuda_vs_cpu(lambda t: fp8flow.quantize(t, "rowwise", "e4m3"), x)
    cuda_vs_cpu(lambda t: fp8flow.quantize(t, "rowwise", "e5m2"), x)
    cuda_vs_cpu(lambda t: fp8flow.quantize(t, "block"), x)
    cuda_vs_cpu(lambda t: fp8flow.quantize_transposed(t, groups), x)
    cuda_vs_cpu(lambda t: fp8flow.quantize_both(t, groups), x)
    cuda_vs_cpu(lambda t: fp8flow.quantize_mxfp4(t), x)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_conversions(shape, kind):
    x = values(shape, kind, seed=31)
    M = shape[0]
    groups = [M // 3, 0, M - M // 3] if M > 1 else [1]
    d, s = fp8flow.quantize(x)
    md, ms = fp8flow.quantize_mxfp4(x)
    for out_dtype in (torch.float32, torch.bfloat16):
        cuda_vs_cpu(lambda a, b: fp8flow.dequantize(a, b, out_dtype=out_dtype), d, s)
        cuda_vs_cpu(lambda a, b: fp8flow.dequantize(a, b, "mx", out_dtype=out_dtype), md, ms)
    for policy in ("column_tight", "tile_max"):
        cuda_vs_cpu(lambda a, b: fp8flow.transpose_scaled(a, b, groups, policy), d, s)
    cuda_vs_cpu(lambda a, b: fp8flow.fp8_to_mxfp4(a, b), d, s)
    cuda_vs_cpu(lambda a, b: fp8flow.mxfp4_to_fp8(a, b), md, ms)
    cuda_vs_cpu(lambda a, b: fp8flow.mxfp4_to_fp8_transposed(a, b, groups), md, ms)


@pytest.mark.cuda
def test_cuda_ops_use_current_stream_and_device():
    x = values((512, 512), "normal", seed=37).cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        d, sc = fp8flow.quantize(x)
    s.synchronize()
    d2, sc2 = fp8flow.quantize(x)
    assert torch.equal(as_bytes(d), as_bytes(d2)) and torch.equal(as_bytes(sc), as_bytes(sc2))


@pytest.mark.cuda
def test_cuda_error_mixed_devices():
    d, s = fp8flow.quantize(torch.randn(8, 128).cuda())
    with pytest.raises(fp8flow.Error, match=r"^fp8flow::dequantize: "):
        fp8flow.dequantize(d, s.cpu())
