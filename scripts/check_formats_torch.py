#!/usr/bin/env python3
"""Cross-check fp8flow's number formats bit for bit against PyTorch and ml_dtypes.

Usage: python3 scripts/check_formats_torch.py BUILD/tools/fp8flow-formats [--seed N] [--scale F]
                                              [--verbose]

Generates float32 inputs by category (normal values at many scales, uniform random bit patterns,
every value of each format, midpoints between consecutive values (ties) and the floats just above
and below them, each format's subnormal range, +-0, NaNs, +-Inf, huge values, FP32 subnormals,
the overflow regions), runs fp8flow-formats on them (its file layout is documented at the top of
tools/formats/fp8flow_formats.cpp) and compares, per format and per category:

  E4M3  torch .to(float8_e4m3fn), ml_dtypes float8_e4m3fn, and the numpy oracle
  E5M2  torch .to(float8_e5m2),   ml_dtypes float8_e5m2,   oracle
  E2M1  ml_dtypes float4_e2m1fn, PyTorch's own test reference
        (torch.testing._internal.common_quantized._f32_to_floatx_unpacked), oracle
  E8M0  torch .to(float8_e8m0fnu), ml_dtypes float8_e8m0fnu, oracle
  BF16  torch .to(bfloat16),       ml_dtypes bfloat16,       oracle
  decode tables of all E4M3/E5M2/E8M0 codes and the 16 E2M1 codes against the same references,
  and the nibble order of the packed E2M1x2 stream (see check_packing for what is relied on).

The oracle is an independent numpy model of fp8flow's documented semantics: nearest representable
value computed in float64, ties to the even code, saturating. It runs everywhere numpy does, so the
script checks something even without torch or ml_dtypes (each missing one is skipped with a
message; without numpy the whole check is skipped).

Documented deviations (include/fp8flow/formats.h), not counted as mismatches but reported:
  saturation   a finite input beyond a format's largest value clamps to it (torch and ml_dtypes
               give NaN or Inf): such inputs are compared against the reference applied to the
               clamped input (E2M1 also clamps +-Inf, which it saturates to +-6).
  e2m1-nan     E2M1 has no NaN: NaN encodes as +0 (checked to be exactly 0x0).
  e8m0-max     E8M0 saturates at 0xFE (2^127) where torch rounds up to the NaN code.
  nan-code     both sides give a NaN encoding, with different payload/sign bits (BF16 with both
               references; E5M2 with ml_dtypes, whose NaN is 0x7E).
  ref-rule     E8M0 vs ml_dtypes: fp8flow follows PyTorch's float8_e8m0fnu rounding (nearest
               power of two, ties up, sign ignored); where ml_dtypes disagrees and fp8flow equals
               the oracle of PyTorch's rule, the difference is reported, not failed.
Anything else is an undocumented mismatch: the script prints the first examples and exits 1.
"""

import argparse
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError:  # pragma: no cover - depends on the machine
    print("check_formats_torch: SKIP: numpy is not installed; nothing checked")
    sys.exit(0)

try:
    import torch
except ImportError as e:
    torch = None
    TORCH_WHY = f"{type(e).__name__}: {e}"
try:
    import ml_dtypes as mld
except ImportError as e:
    mld = None
    MLD_WHY = f"{type(e).__name__}: {e}"

F32_MAX = float(np.finfo(np.float32).max)
np.seterr(all="ignore")  # NaN, Inf and overflow are inputs here, on purpose

# ---------------------------------------------------------------------------------------------
# Format descriptions and the numpy oracle.


class Minifloat:
    """A sign + E exponent bits + M mantissa bits format with bias `bias`; codes 0..max_code are the
    finite magnitudes in increasing order."""

    def __init__(self, name, ebits, mbits, bias, max_code, sign_bit):
        self.name, self.ebits, self.mbits, self.bias = name, ebits, mbits, bias
        self.max_code, self.sign_bit = max_code, sign_bit
        vals = []
        for c in range(max_code + 1):
            e, m = c >> mbits, c & ((1 << mbits) - 1)
            if e == 0:
                vals.append(m / 2.0**mbits * 2.0 ** (1 - bias))
            else:
                vals.append((1 + m / 2.0**mbits) * 2.0 ** (e - bias))
        self.values = np.array(vals, dtype=np.float64)  # magnitudes, index = code
        self.max = float(self.values[-1])


E4M3 = Minifloat("e4m3", 4, 3, 7, 0x7E, 0x80)
E5M2 = Minifloat("e5m2", 5, 2, 15, 0x7B, 0x80)
E2M1 = Minifloat("e2m1", 2, 1, 1, 0x7, 0x8)
E8M0_MAX = 2.0**127


def f32_bits(x):
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def oracle_minifloat(fmt, x):
    """Nearest value in float64, ties to the even code, saturating; sign of zero kept.
    Non-finite: E4M3 NaN/Inf -> 0x7F|s; E5M2 NaN -> 0x7F|s, Inf -> 0x7C|s; E2M1 NaN -> 0, Inf -> 7|s.
    """
    x = np.asarray(x, dtype=np.float32)
    bits = f32_bits(x)
    neg = (bits >> 31).astype(bool)
    a = np.abs(x.astype(np.float64))
    finite = np.isfinite(x)
    a_sat = np.where(finite, np.minimum(a, fmt.max), 0.0)
    v = fmt.values
    idx = np.searchsorted(v, a_sat, side="left")
    hi = np.clip(idx, 0, len(v) - 1)
    lo = np.clip(idx - 1, 0, len(v) - 1)
    dlo = a_sat - v[lo]
    dhi = v[hi] - a_sat
    take_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(take_hi, hi, lo).astype(np.uint8)
    code = code | np.where(neg, fmt.sign_bit, 0).astype(np.uint8)
    nan = np.isnan(x)
    inf = np.isinf(x)
    sgn = np.where(neg, fmt.sign_bit, 0).astype(np.uint8)
    if fmt is E4M3:
        code = np.where(nan | inf, 0x7F | sgn, code)
    elif fmt is E5M2:
        code = np.where(nan, 0x7F | sgn, code)
        code = np.where(inf, 0x7C | sgn, code)
    else:
        code = np.where(nan, 0, code)
        code = np.where(inf, 0x7 | sgn, code)
    return code.astype(np.uint8)


def oracle_e8m0(x):
    """PyTorch's float8_e8m0fnu rule (c10 fp8e8m0fnu_from_fp32_value), sign ignored:
    normal FP32 |x| = s * 2^e, s in [1, 2): code e + 127, plus one when s >= 1.5 (nearest power
    of two, ties up); FP32 subnormals round as if code 0 meant 0 (RNE between 0 and 2^-126):
    |x| > 2^-127 -> 0x01 (2^-126), else 0x00 (which decodes as 2^-127); NaN/Inf -> 0xFF.
    fp8flow saturates at 0xFE where PyTorch would round up to 0xFF (documented)."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x.astype(np.float64))
    finite = np.isfinite(a)
    safe = np.where(finite & (a > 0), a, 1.0)
    m, e = np.frexp(safe)  # safe = m * 2^e, m in [0.5, 1)
    code = (e - 1 + 127) + (2 * m >= 1.5)
    code = np.where(a < 2.0**-126, np.where(a > 2.0**-127, 1, 0), code)
    code = np.minimum(code, 0xFE)
    code = np.where(finite, code, 0xFF)
    return code.astype(np.uint8)


def bf16_to_f64(code):
    return (code.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def oracle_bf16(x):
    """Nearest BF16 in float64, ties to even; beyond the largest finite value rounds to Inf as IEEE;
    NaN -> a quiet NaN (compared by NaN-ness)."""
    x = np.asarray(x, dtype=np.float32)
    bits = f32_bits(x)
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF
    lo = (mag >> 16).astype(np.uint32)
    lo_c = np.minimum(lo, 0x7F7F)  # keep the arithmetic finite; Inf/NaN handled below
    lo_v = bf16_to_f64(lo_c)
    hi_v = np.where(lo_c == 0x7F7F, 2.0**128, bf16_to_f64(lo_c + 1))
    a = np.abs(x.astype(np.float64))
    a = np.where(np.isfinite(a), a, 0.0)
    dlo, dhi = a - lo_v, hi_v - a
    take_hi = (dhi < dlo) | ((dhi == dlo) & (lo_c % 2 == 1))
    code = np.where(take_hi, lo_c + 1, lo_c).astype(np.uint32)
    code = np.where(np.isinf(x), 0x7F80, code)
    code = np.where(np.isnan(x), 0x7FC0, code)
    return (code | sign).astype(np.uint16)


def oracle_decode_minifloat(fmt, ncodes):
    out = np.zeros(ncodes, dtype=np.float32)
    for c in range(ncodes):
        mag = c & (fmt.sign_bit - 1)
        neg = bool(c & fmt.sign_bit)
        if mag <= fmt.max_code:
            v = fmt.values[mag]
        elif fmt is E5M2 and mag == 0x7C:
            v = np.inf
        else:
            v = np.nan
        out[c] = -v if neg else v
    return out


def oracle_decode_e8m0():
    out = np.array([2.0 ** (c - 127) for c in range(256)], dtype=np.float64)
    out[255] = np.nan
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Inputs by category.


def f32(a):
    return np.asarray(a, dtype=np.float32)


def both_signs(a):
    a = f32(a)
    return np.concatenate([a, -a])


def around(a):
    """The floats just below and just above each value (and the values themselves)."""
    a = f32(a)
    return np.concatenate([a, np.nextafter(a, f32(np.inf)), np.nextafter(a, f32(-np.inf))])


def midpoints(values):
    v = np.asarray(values, dtype=np.float64)
    return f32((v[:-1] + v[1:]) / 2)  # exact in float32 for every format here


def make_inputs(rng, scale):
    n = max(1, int(scale))
    cats = {}
    # Realistic values at every binade the formats and scale rules meet.
    ks = np.arange(-150, 131)
    cats["normal_scaled"] = f32(
        (rng.standard_normal((len(ks), 1500 * n)) * np.exp2(ks.astype(np.float64))[:, None]).ravel()
    )
    cats["uniform_bits"] = rng.integers(0, 2**32, size=400_000 * n, dtype=np.uint64).astype(
        np.uint32).view(np.float32)
    # Every value of each format (and the floats next to them).
    cats["every_e4m3"] = around(both_signs(E4M3.values))
    cats["every_e5m2"] = around(both_signs(E5M2.values))
    cats["every_e2m1"] = around(both_signs(E2M1.values))
    pow2 = np.exp2(np.arange(-127, 128).astype(np.float64))
    cats["every_e8m0"] = around(both_signs(pow2))
    cats["every_bf16"] = (np.arange(0, 1 << 16, dtype=np.uint32) << 16).view(np.float32)
    # Ties (midpoints between consecutive magnitudes, plus one past the largest) and their
    # neighbours.
    for fmt in (E4M3, E5M2, E2M1):
        v = np.append(fmt.values, fmt.max + (fmt.values[-1] - fmt.values[-2]))
        t = both_signs(midpoints(v))
        cats[f"ties_{fmt.name}"] = t
        cats[f"near_ties_{fmt.name}"] = np.concatenate(
            [np.nextafter(t, f32(np.inf)), np.nextafter(t, f32(-np.inf))])
    t8 = both_signs(1.5 * pow2)
    cats["ties_e8m0"] = t8
    cats["near_ties_e8m0"] = np.concatenate(
        [np.nextafter(t8, f32(np.inf)), np.nextafter(t8, f32(-np.inf))])
    hi = rng.integers(0, 0x7F7F, size=100_000 * n, dtype=np.uint32)
    sg = rng.integers(0, 2, size=hi.size, dtype=np.uint32) << 31
    tie_bits = (hi << 16) | 0x8000 | sg
    cats["ties_bf16"] = tie_bits.view(np.float32)
    cats["near_ties_bf16"] = np.concatenate(
        [(tie_bits + 1).view(np.float32), (tie_bits - 1).view(np.float32)])
    # Each format's subnormal range (and below its smallest subnormal), random.
    for name, min_normal in (("e4m3", 2.0**-6), ("e5m2", 2.0**-14), ("e2m1", 1.0)):
        cats[f"subnormal_{name}"] = both_signs(rng.uniform(0, min_normal, size=50_000 * n))
    cats["subnormal_e8m0"] = both_signs(rng.uniform(0, 2.0**-126, size=50_000 * n))
    # The overflow regions: around each largest value and past it.
    over = []
    for m in (E4M3.max, E5M2.max, E2M1.max, E8M0_MAX, float(bf16_to_f64(np.array([0x7F7F]))[0])):
        over.append(f32(np.linspace(0.9 * m, min(1.6 * m, F32_MAX), 20_000)))
    cats["overflow"] = around(both_signs(np.concatenate(over)))
    # Special values.
    nan_bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF,
                         0x7FA00000, 0x7F800100], dtype=np.uint32)
    cats["nan"] = nan_bits.view(np.float32)
    cats["inf"] = f32([np.inf, -np.inf])
    cats["zero"] = f32([0.0, -0.0])
    cats["huge"] = both_signs([F32_MAX, 1e38, 3e38, 2.0**127, 1.5 * 2.0**127, 1e30, 1e20, 65536.0,
                               65504.0, 61440.0, 57344.0, 512.0, 480.0, 464.0, 449.0, 448.0])
    fsub = rng.integers(1, 0x800000, size=100_000 * n, dtype=np.uint32)
    fsub = np.concatenate([fsub, np.array([1, 0x7FFFFF, 0x400000, 0x600000, 0x200000],
                                          dtype=np.uint32)])
    cats["fp32_subnormal"] = both_signs(fsub.view(np.float32))
    return cats


# ---------------------------------------------------------------------------------------------
# Running fp8flow-formats.


def run_tool(tool, x):
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.f32"), os.path.join(d, "out.bin")
        x.astype("<f4").tofile(src)
        subprocess.run([tool, src, dst], check=True)
        buf = np.fromfile(dst, dtype=np.uint8)
    if bytes(buf[:8]) != b"FP8FLOWF":
        raise SystemExit("check_formats_torch: bad magic in fp8flow-formats output")
    version, hdr = buf[8:16].view("<u4")
    (n,) = buf[16:24].view("<u8")
    if version != 1 or n != x.size:
        raise SystemExit(f"check_formats_torch: unexpected header (version {version}, n {n})")
    off = int(hdr)
    out = {}

    def take(name, count, dtype):
        nonlocal off
        size = count * np.dtype(dtype).itemsize
        out[name] = buf[off:off + size].view(dtype).copy()
        off += size

    n = int(n)
    for name in ("e4m3", "e5m2", "e2m1", "e8m0"):
        take(name, n, np.uint8)
    take("bf16", n, "<u2")
    take("e2m1x2", (n + 1) // 2, np.uint8)
    take("dec_e4m3", 256, "<f4")
    take("dec_e5m2", 256, "<f4")
    take("dec_e2m1", 16, "<f4")
    take("dec_e8m0", 256, "<f4")
    if off != buf.size:
        raise SystemExit(f"check_formats_torch: output size {buf.size}, expected {off}")
    return out


# ---------------------------------------------------------------------------------------------
# References. Each returns codes (uint8/uint16 arrays) or raises.


def torch_encode(dtype_name, x):
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if dtype_name == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype_name)).view(torch.uint8).numpy()


def mld_encode(dtype_name, x):
    r = np.asarray(x, dtype=np.float32).astype(getattr(mld, dtype_name))
    if dtype_name == "bfloat16":
        return r.view(np.uint16)
    codes = r.view(np.uint8)
    return codes & 0x0F if dtype_name == "float4_e2m1fn" else codes


def torch_testing_e2m1(x):
    from torch.testing._internal.common_quantized import _f32_to_floatx_unpacked

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return _f32_to_floatx_unpacked(t, 2, 1).numpy()


# ---------------------------------------------------------------------------------------------
# Comparison.


def is_nan_code(fmt, c):
    c = c.astype(np.uint32)
    if fmt == "e4m3":
        return (c & 0x7F) == 0x7F
    if fmt == "e5m2":
        return (c & 0x7F) > 0x7C
    if fmt == "e8m0":
        return c == 0xFF
    if fmt == "bf16":
        return (c & 0x7FFF) > 0x7F80
    return np.zeros(c.shape, dtype=bool)


MAXES = {"e4m3": E4M3.max, "e5m2": E5M2.max, "e2m1": E2M1.max, "e8m0": E8M0_MAX}


class Result:
    def __init__(self):
        self.failures = []  # (title, message)
        self.documented = 0
        self.checked = 0
        self.skipped = []

    def fail(self, title, msg):
        self.failures.append((title, msg))


def fmt_example(xv, ours, ref, width):
    xb = int(np.float32(xv).view(np.uint32))
    return f"x={float(xv)!r} (0x{xb:08x}) ours=0x{int(ours):0{width}x} ref=0x{int(ref):0{width}x}"


def compare(res, fmt, ref_name, ref_fn, x, cat_ids, cat_names, ours, *, clamp, nan_lenient,
            skip_nan=False, ref_rule=None, verbose=False):
    """Compares `ours` with ref_fn applied to x (clamped where fp8flow saturates)."""
    title = f"[{fmt}] vs {ref_name}"
    width = 4 if fmt == "bf16" else 2
    xr = x
    if clamp:
        m = np.float32(MAXES[fmt])
        clamp_inf = fmt == "e2m1"
        sel = np.isfinite(x) | (clamp_inf & np.isinf(x))
        xr = np.where(sel, np.clip(x, -m, m), x).astype(np.float32)
    try:
        ref = ref_fn(xr)
    except Exception as e:  # a reference that cannot run here is skipped, with the reason
        res.skipped.append(f"{title}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        print(f"{title}: SKIP ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return
    ref = ref.astype(ours.dtype)
    doc = {}
    diff = ours != ref
    # Documented: saturation (E8M0: at 0xFE), where the clamped comparison passes and the
    # reference on the raw input differs.
    if clamp:
        changed = xr.view(np.uint32) != x.view(np.uint32)
        raw = ref_fn(x).astype(ours.dtype)
        key = "e8m0-max" if fmt == "e8m0" else "saturation"
        doc[key] = int(np.count_nonzero(changed & ~diff & (raw != ours)))
    if skip_nan:  # E2M1: NaN -> +0 by definition
        nanx = np.isnan(x)
        bad_nan = nanx & (ours != 0)
        diff = diff & ~nanx
        doc["e2m1-nan"] = int(np.count_nonzero(nanx & ~bad_nan))
        diff = diff | bad_nan
    if nan_lenient:
        both_nan = diff & is_nan_code(fmt, ours) & is_nan_code(fmt, ref)
        doc["nan-code"] = int(np.count_nonzero(both_nan))
        diff = diff & ~both_nan
    if ref_rule is not None:
        follows = diff & (ours == ref_rule)
        doc["ref-rule"] = int(np.count_nonzero(follows))
        diff = diff & ~follows
    ndoc = sum(doc.values())
    nbad = int(np.count_nonzero(diff))
    res.checked += x.size
    res.documented += ndoc
    docs = ", ".join(f"{k} {v}" for k, v in doc.items() if v)
    status = "ok" if nbad == 0 else "MISMATCH"
    print(f"{title}: {status}: {x.size} values, {nbad} undocumented mismatches"
          + (f"; documented: {docs}" if docs else ""))
    for ci, cname in enumerate(cat_names):
        sel = cat_ids == ci
        bad = diff & sel
        nb = int(np.count_nonzero(bad))
        if nb == 0 and not verbose:
            continue
        line = f"    {cname:<18} {int(np.count_nonzero(sel)):>9} values {nb:>7} mismatches"
        print(line)
        for i in np.flatnonzero(bad)[:3]:
            print(f"        {fmt_example(x[i], ours[i], ref[i], width)}")
    if nbad:
        i = np.flatnonzero(diff)[0]
        res.fail(title, f"{nbad} mismatches; first {fmt_example(x[i], ours[i], ref[i], width)}")


def compare_table(res, title, ours, ref, nan_lenient=True):
    """Decode tables: float32 bit patterns equal, or both NaN."""
    ob, rb = ours.view(np.uint32), np.asarray(ref, dtype=np.float32).view(np.uint32)
    diff = ob != rb
    both_nan = np.isnan(ours) & np.isnan(np.asarray(ref, dtype=np.float32))
    if nan_lenient:
        diff &= ~both_nan
    n = int(np.count_nonzero(diff))
    res.checked += ours.size
    print(f"{title}: {'ok' if n == 0 else 'MISMATCH'}: {ours.size} codes, {n} mismatches")
    for c in np.flatnonzero(diff)[:5]:
        print(f"    code 0x{c:02x}: ours {ours[c]!r} (0x{ob[c]:08x}) ref "
              f"{float(np.float32(ref[c]))!r} (0x{rb[c]:08x})")
    if n:
        res.fail(title, f"{n} codes differ")


def safe_table(res, title, fn):
    try:
        return fn()
    except Exception as e:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        res.skipped.append(f"{title}: {msg}")
        print(f"{title}: SKIP ({msg})")
        return None


def check_decode_tables(res, out):
    print("\n== decode tables")
    compare_table(res, "[dec e4m3] vs oracle", out["dec_e4m3"], oracle_decode_minifloat(E4M3, 256))
    compare_table(res, "[dec e5m2] vs oracle", out["dec_e5m2"], oracle_decode_minifloat(E5M2, 256))
    compare_table(res, "[dec e2m1] vs oracle", out["dec_e2m1"], oracle_decode_minifloat(E2M1, 16))
    compare_table(res, "[dec e8m0] vs oracle", out["dec_e8m0"], oracle_decode_e8m0())
    codes = np.arange(256, dtype=np.uint8)
    if torch is not None:
        tc = torch.from_numpy(codes)
        for fmt, dt in (("e4m3", "float8_e4m3fn"), ("e5m2", "float8_e5m2"),
                        ("e8m0", "float8_e8m0fnu")):
            ref = safe_table(res, f"[dec {fmt}] vs torch {dt}",
                             lambda dt=dt: tc.view(getattr(torch, dt)).to(torch.float32).numpy())
            if ref is not None:
                compare_table(res, f"[dec {fmt}] vs torch {dt}", out[f"dec_{fmt}"], ref)

        def torch_e2m1_dec():
            from torch.testing._internal.common_quantized import _floatx_unpacked_to_f32

            return _floatx_unpacked_to_f32(torch.arange(16, dtype=torch.uint8), 2, 1).numpy()

        ref = safe_table(res, "[dec e2m1] vs torch testing _floatx_unpacked_to_f32", torch_e2m1_dec)
        if ref is not None:
            compare_table(res, "[dec e2m1] vs torch testing _floatx_unpacked_to_f32",
                          out["dec_e2m1"], ref)
    if mld is not None:
        for fmt, dt, n in (("e4m3", "float8_e4m3fn", 256), ("e5m2", "float8_e5m2", 256),
                           ("e8m0", "float8_e8m0fnu", 256), ("e2m1", "float4_e2m1fn", 16)):
            ref = safe_table(res, f"[dec {fmt}] vs ml_dtypes {dt}",
                             lambda dt=dt, n=n: codes[:n].view(getattr(mld, dt)).astype(np.float32))
            if ref is not None:
                compare_table(res, f"[dec {fmt}] vs ml_dtypes {dt}", out[f"dec_{fmt}"], ref)


def check_packing(res, out):
    """Nibble order of the packed E2M1x2 stream. Relied on, in this order:
    1. our stream equals pack(e2m1[2j] in bits 0-3, e2m1[2j+1] in bits 4-7) of the tool's own
       unpacked codes (the documented order, fmt::pack_e2m1x2);
    2. PyTorch's own packing helper for torch.float4_e2m1fn_x2
       (torch.testing._internal.common_quantized.pack_uint4, which its MX tests view as
       float4_e2m1fn_x2) gives the same bytes from the same codes;
    3. if torch can unpack float4_e2m1fn_x2 itself (e.g. .to(float32)), that too (usually it cannot:
       the dtype is a bit container, which is reported, not failed).
    ml_dtypes has no packed FP4 type, so it has nothing to say here."""
    print("\n== E2M1x2 nibble order")
    codes = out["e2m1"]
    padded = np.append(codes, np.uint8(0)) if codes.size % 2 else codes
    want = (padded[0::2] & 0xF) | ((padded[1::2] & 0xF) << 4)
    n = int(np.count_nonzero(want != out["e2m1x2"]))
    res.checked += want.size
    print(f"[e2m1x2] vs documented order (first element in bits 0-3): "
          f"{'ok' if n == 0 else 'MISMATCH'}: {want.size} bytes, {n} differ")
    if n:
        res.fail("[e2m1x2] vs documented order", f"{n} bytes differ")
    if torch is None:
        print("[e2m1x2] vs torch: SKIP (torch not importable)")
        return
    if not hasattr(torch, "float4_e2m1fn_x2"):
        print("[e2m1x2] vs torch: SKIP (this torch has no float4_e2m1fn_x2)")
        return
    try:
        from torch.testing._internal.common_quantized import pack_uint4

        tb = pack_uint4(torch.from_numpy(padded.copy())).view(
            torch.float4_e2m1fn_x2).view(torch.uint8).numpy()
        n = int(np.count_nonzero(tb != out["e2m1x2"]))
        res.checked += tb.size
        print(f"[e2m1x2] vs torch testing pack_uint4 -> float4_e2m1fn_x2: "
              f"{'ok' if n == 0 else 'MISMATCH'}: {tb.size} bytes, {n} differ")
        if n:
            res.fail("[e2m1x2] vs torch pack_uint4", f"{n} bytes differ")
    except Exception as e:
        print(f"[e2m1x2] vs torch testing pack_uint4: SKIP ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:160] if str(e) else ''})")
    # Can torch decode float4_e2m1fn_x2 by itself? Two codes per byte: 0x21 is (0.5, 1.0) when
    # the first element is in the low nibble.
    try:
        probe = torch.tensor([0x21], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
        vals = probe.to(torch.float32).flatten().tolist()
        print(f"[e2m1x2] torch decodes byte 0x21 as {vals} "
              "(low nibble first would be [0.5, 1.0])")
        if vals == [1.0, 0.5]:  # the other nibble order; anything else is only reported
            res.fail("[e2m1x2] torch float4_e2m1fn_x2 decode", f"0x21 -> {vals}")
    except Exception as e:
        print(f"[e2m1x2] torch cannot convert float4_e2m1fn_x2 itself ({type(e).__name__}); "
              "relying on its packing helper above")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tool", help="path to the fp8flow-formats binary")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the random category sizes (default 1: about 2.4 M values)")
    ap.add_argument("--verbose", action="store_true", help="print every category line")
    args = ap.parse_args()
    if not os.access(args.tool, os.X_OK):
        print(f"check_formats_torch: {args.tool}: not an executable", file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    cats = make_inputs(rng, args.scale)
    cat_names = list(cats)
    x = np.concatenate([cats[k] for k in cat_names]).astype(np.float32)
    cat_ids = np.concatenate([np.full(cats[k].size, i, dtype=np.int32)
                              for i, k in enumerate(cat_names)])
    out = run_tool(args.tool, x)

    print(f"check_formats_torch: {x.size} inputs in {len(cat_names)} categories; numpy "
          f"{np.__version__}; torch {torch.__version__ if torch else 'missing'}; ml_dtypes "
          f"{getattr(mld, '__version__', '?') if mld else 'missing'}")
    res = Result()
    if torch is None:
        res.skipped.append(f"torch: {TORCH_WHY}")
        print(f"SKIP every torch comparison: torch is not importable ({TORCH_WHY})")
    if mld is None:
        res.skipped.append(f"ml_dtypes: {MLD_WHY}")
        print(f"SKIP every ml_dtypes comparison: ml_dtypes is not importable ({MLD_WHY})")

    common = dict(x=x, cat_ids=cat_ids, cat_names=cat_names, verbose=args.verbose)
    rule_e8m0 = oracle_e8m0(x)
    for fmt, fmtobj, tdt, mdt in (("e4m3", E4M3, "float8_e4m3fn", "float8_e4m3fn"),
                                  ("e5m2", E5M2, "float8_e5m2", "float8_e5m2")):
        print(f"\n== {fmt}")
        ours = out[fmt]
        compare(res, fmt, "oracle", lambda v, f=fmtobj: oracle_minifloat(f, v), ours=ours,
                clamp=False, nan_lenient=False, **common)
        if torch is not None:
            compare(res, fmt, f"torch {tdt}", lambda v, d=tdt: torch_encode(d, v), ours=ours,
                    clamp=True, nan_lenient=False, **common)
        if mld is not None:
            compare(res, fmt, f"ml_dtypes {mdt}", lambda v, d=mdt: mld_encode(d, v), ours=ours,
                    clamp=True, nan_lenient=(fmt == "e5m2"), **common)

    print("\n== e2m1")
    ours = out["e2m1"]
    if int(np.count_nonzero(ours & 0xF0)):
        res.fail("[e2m1] high bits", "codes have bits 4-7 set")
    compare(res, "e2m1", "oracle", lambda v: oracle_minifloat(E2M1, v), ours=ours, clamp=False,
            nan_lenient=False, **common)
    if mld is not None:
        compare(res, "e2m1", "ml_dtypes float4_e2m1fn", lambda v: mld_encode("float4_e2m1fn", v),
                ours=ours, clamp=True, nan_lenient=False, skip_nan=True, **common)
    if torch is not None:
        compare(res, "e2m1", "torch testing _f32_to_floatx_unpacked", torch_testing_e2m1,
                ours=ours, clamp=True, nan_lenient=False, skip_nan=True, **common)

    print("\n== e8m0")
    ours = out["e8m0"]
    compare(res, "e8m0", "oracle (PyTorch's rule, saturating)", oracle_e8m0, ours=ours,
            clamp=False, nan_lenient=False, **common)
    if torch is not None:
        compare(res, "e8m0", "torch float8_e8m0fnu", lambda v: torch_encode("float8_e8m0fnu", v),
                ours=ours, clamp=True, nan_lenient=False, **common)
    if mld is not None:
        compare(res, "e8m0", "ml_dtypes float8_e8m0fnu", lambda v: mld_encode("float8_e8m0fnu", v),
                ours=ours, clamp=True, nan_lenient=False, ref_rule=rule_e8m0, **common)

    print("\n== bf16")
    ours = out["bf16"]
    compare(res, "bf16", "oracle", oracle_bf16, ours=ours, clamp=False, nan_lenient=True, **common)
    if torch is not None:
        compare(res, "bf16", "torch bfloat16", lambda v: torch_encode("bfloat16", v), ours=ours,
                clamp=False, nan_lenient=True, **common)
    if mld is not None:
        compare(res, "bf16", "ml_dtypes bfloat16", lambda v: mld_encode("bfloat16", v), ours=ours,
                clamp=False, nan_lenient=True, **common)

    check_decode_tables(res, out)
    check_packing(res, out)

    print()
    for s in res.skipped:
        print(f"skipped: {s}")
    if res.failures:
        print(f"RESULT: FAIL: {len(res.failures)} comparisons with undocumented mismatches:")
        for title, msg in res.failures:
            print(f"  {title}: {msg}")
        return 1
    print(f"RESULT: PASS: {res.checked} comparisons bit-exact; {res.documented} documented "
          f"deviations; {len(res.skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
