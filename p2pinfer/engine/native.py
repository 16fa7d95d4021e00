"""Hand-written C bodies for the kernels that decide decode and prefill speed, swapped into tinygrad's kernels.

- matvec / matmul of Q4_0, Q4_1 and Q8_0 weights (c_source for T=1, c_source_batched for T>1). tinygrad's
  generated kernels converted one byte at a time with 16 scalar accumulators: 2-9 GB/s from DRAM depending on
  shape (Q4_0 5632x2048 ~2 GB/s, the 49152x2048 LM head ~2.4). Here the same math is written with clang
  vector extensions (the same source builds for AVX2, AVX-512 or NEON through -march=native); on AVX-512 a
  nibble becomes its float by one permute from a 16-entry table; a software prefetch runs 8 KiB ahead; 4 rows
  per iteration share each load of x. 20-29 GB/s on this box's 2 threads, i.e. its DRAM bandwidth. For T>1
  each dequantised block serves 8 rows of x. x stays float32 (it is NOT quantised to 8 bits as llama.cpp
  does), so results equal gguf's dequantise + matmul up to float rounding (~3e-7 relative). Q4_K and Q6_K
  have decode (T=1) bodies (c_source_q4k, c_source_q6k): 12-17 GB/s on 2 threads, 2-4x tinygrad's.
- causal attention over a layer's KV cache (attention): softmax(q K^T / sqrt(d)) V for every query head and
  row in one kernel, heads split over threads (tinygrad's version took 5 kernels, single-threaded, ~0.7 ms a
  layer at 250 positions for a 1B model; this one ~0.1 ms on one thread).

How it enters tinygrad: a kernel is first scheduled from an ordinary tinygrad expression with the same buffers
(qlinear's own expression; a one-line skeleton for attention), which fixes the argument order, the variables
(start_pos, core_id) and the core_id slices; that kernel is rendered with tinygrad's clang renderer to read the
C signature, our body is compiled under that signature with tinygrad's clang compiler (cached on disk by
source), and the finished PROGRAM UOp goes to Tensor.custom_kernel in place of an AST. Everything downstream
(TinyJit capture, the runner's kernel tables, the disk cache) sees an ordinary CPU program. Slice c of S
handles rows (heads) [c*N/S, (c+1)*N/S): even however N divides. Without clang, or if tinygrad's internals
change, the callers warn and keep tinygrad's kernels.
"""

from __future__ import annotations

import re
from dataclasses import replace

from gguf import GGMLQuantizationType as Q

NATIVE_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)  # the K-quants: T=1 only
# output rows per iteration (x loads shared, independent chains)
ROWS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 1, Q.Q4_K: 2, Q.Q6_K: 2}
PREFETCH = 8192  # bytes ahead of the rows being read to prefetch (0: none)
PERMUTE = True  # AVX-512 nibble -> float by table permute (see _BLOCK_AVX512); False: the portable body only

_PRELUDE = r"""
typedef float f32x16 __attribute__((vector_size(64)));
typedef unsigned char u8x16 __attribute__((vector_size(16)));
typedef signed char i8x16 __attribute__((vector_size(16)));
static inline f32x16 ldx(const float *p) { f32x16 v; __builtin_memcpy(&v, p, 64); return v; }
static inline u8x16 ldq(const unsigned char *p) { u8x16 v; __builtin_memcpy(&v, p, 16); return v; }
static inline i8x16 ldi(const signed char *p) { i8x16 v; __builtin_memcpy(&v, p, 16); return v; }
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef unsigned char u8x8 __attribute__((vector_size(8)));
static inline float hsum(f32x16 a) { /* a tree: 4 shuffles + 4 adds */
  f32x8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}
static inline float h2f(unsigned short u) { /* exact for normals, subnormals, zeros */
  unsigned int b = ((unsigned int)(u & 0x7FFF) << 13) | ((unsigned int)(u & 0x8000) << 16);
  float f; __builtin_memcpy(&f, &b, 4); return f * 0x1p112f;
}
"""

# per type: the body of one block for row j (bp: the row's block index base), using xl/xh (x of this block)
_BLOCK = {
    Q.Q4_0: """
      {{ u8x16 q = ldq(qs + (bp{j} + b) * 16);
        f32x16 lo = __builtin_convertvector((i8x16)(q & 15) - 8, f32x16);
        f32x16 hi = __builtin_convertvector((i8x16)(q >> 4) - 8, f32x16);
        acc{j} += d[bp{j} + b] * (lo * xl + hi * xh); }}""",
    Q.Q4_1: """
      {{ u8x16 q = ldq(qs + (bp{j} + b) * 16);
        f32x16 lo = __builtin_convertvector(q & 15, f32x16);
        f32x16 hi = __builtin_convertvector(q >> 4, f32x16);
        acc{j} += d[bp{j} + b] * (lo * xl + hi * xh);
        macc{j} += h2f(m[bp{j} + b]) * xs[b]; }}""",
    Q.Q8_0: """
      {{ const signed char *p = qs + (bp{j} + b) * 32;
        f32x16 lo = __builtin_convertvector(ldi(p), f32x16);
        f32x16 hi = __builtin_convertvector(ldi(p + 16), f32x16);
        acc{j} += d[bp{j} + b] * (lo * xl + hi * xh); }}""",
}

# AVX-512: a nibble becomes its float in one permute from a 16-entry table (vpermps reads the index's low 4 bits),
# instead of mask, widen and convert: 7 instead of 12 vector uops per block and row (~1.7x in cache)
_BLOCK_AVX512 = {
    Q.Q4_0: """
      {{ __m512i qi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + (bp{j} + b) * 16)));
        f32x16 lo = (f32x16)_mm512_permutexvar_ps(qi, tbl), hi = (f32x16)_mm512_permutexvar_ps(_mm512_srli_epi32(qi, 4), tbl);
        acc{j} += d[bp{j} + b] * (lo * xl + hi * xh); }}""",
}
_BLOCK_AVX512[Q.Q4_1] = (  # F16C: the fp16 min widened by one instruction
    _BLOCK_AVX512[Q.Q4_0].rstrip("}").rstrip() + "\n        macc{j} += _cvtsh_ss(m[bp{j} + b]) * xs[b]; }}"
)
_TABLE = {Q.Q4_0: -8, Q.Q4_1: 0}  # the float of nibble i is i + this

_PARAM_TYPES = {
    "_out": "float* restrict out",
    "_x": "const float* restrict x",
    "d": "const float* restrict d",
    "m": "const unsigned short* restrict m",
    "dm": "const float* restrict dm",
    "scm": "const unsigned char* restrict scm",
    "sc": "const signed char* restrict sc",
    "ql": "const unsigned char* restrict ql",
    "qh": "const unsigned char* restrict qh",
}


def _params(qt, slots: list[str]) -> str:
    qs = "const signed char* restrict qs" if qt == Q.Q8_0 else "const unsigned char* restrict qs"
    return ", ".join(_PARAM_TYPES.get(s, qs) for s in slots) + ", const int core_id"


def _opening(name: str, qt, n: int, slots: list[str], slices: int) -> list[str]:
    """A matmul kernel's first lines: the prelude, its signature, the nibble table, slice core_id's rows."""
    lines = [
        "#if defined(__AVX512F__)\n#include <immintrin.h>\n#endif",
        _PRELUDE,
        f"void {name}({_params(qt, slots)}) {{",
    ]
    if qt in _TABLE:
        vals = ", ".join(f"{i + _TABLE[qt]}.0f" for i in range(16))
        lines.append(f"#if defined(__AVX512F__)\n  const __m512 tbl = _mm512_setr_ps({vals});\n#endif")
    lines.append(
        f"  const int r0 = (int)(((long)core_id * {n}) / {slices}), r1 = (int)(((long)(core_id + 1) * {n}) / {slices});"
    )
    return lines


def c_source(name: str, qt, n: int, k: int, slots: list[str], slices: int) -> str:
    """C source of `name`: y[N] = W[N, K] x[K] for rows of slice core_id of `slices`."""
    nb, rows = k // 32, ROWS[qt]
    lines = _opening(name, qt, n, slots, slices)
    if qt == Q.Q4_1:  # the min's contribution is m * sum(x over the block): sums computed once per call
        lines.append(f"  float xs[{nb}];")
        lines.append(
            f"  for (int b = 0; b < {nb}; b++) xs[b] = hsum(ldx(x + b * 32) + ldx(x + b * 32 + 16));"
        )

    def loop(count: int, label: str) -> None:
        lines.append(f"  for (; r + {count} <= r1; r += {count}) {{ /* {label} */")
        for j in range(count):
            lines.append(f"    f32x16 acc{j} = {{0}}; const long bp{j} = (long)(r + {j}) * {nb};")
            if qt == Q.Q4_1:
                lines.append(f"    float macc{j} = 0.0f;")
        lines.append(f"    for (int b = 0; b < {nb}; b++) {{")
        if PREFETCH:
            qb = 32 if qt == Q.Q8_0 else 16  # quant bytes per block
            lines.append(
                f"      __builtin_prefetch((const char *)qs + (bp0 + (long)b * {count}) * {qb} + {PREFETCH});"
            )
            lines.append(
                f"      __builtin_prefetch((const char *)d + (bp0 + (long)b * {count}) * 4 + {PREFETCH // 4});"
            )
        lines.append("      f32x16 xl = ldx(x + b * 32), xh = ldx(x + b * 32 + 16);")
        avx512 = PERMUTE and qt in _BLOCK_AVX512
        if avx512:
            lines.append("#if defined(__AVX512F__)")
            lines.extend(_BLOCK_AVX512[qt].format(j=j) for j in range(count))
            lines.append("#else")
        lines.extend(_BLOCK[qt].format(j=j) for j in range(count))
        if avx512:
            lines.append("#endif")
        lines.append("    }")
        for j in range(count):
            tail = f" + macc{j}" if qt == Q.Q4_1 else ""
            lines.append(f"    out[r + {j}] = hsum(acc{j}){tail};")
        lines.append("  }")

    lines.append("  int r = r0;")
    loop(rows, f"{rows} rows at a time")
    if rows > 1:
        loop(1, "the rest")
    lines.append("}")
    return "\n".join(lines) + "\n"


# 1 < T <= ROWS_MAX_T (a decode step of several sessions): each dequantised block serves every x row, and each
# (weight row, x row) accumulates in exactly the order of the T=1 body, so a session's output in a batch equals,
# bit for bit, what it gets alone (greedy answers do not depend on who else is decoding)
ROWS_MAX_T = 8


def rows_exact(qt) -> bool:
    """A matmul of this weight type over a few rows gives each row exactly its T=1 result (c_source_rows)."""
    return qt in _BLOCK and available()


def c_source_rows(name: str, qt, n: int, k: int, t: int, slots: list[str], slices: int) -> str:
    """C source of `name`: y[T, N] = x[T, K] W[N, K]^T for rows of slice core_id, each row of x as c_source."""
    nb = k // 32
    lines = _opening(name, qt, n, slots, slices)
    if qt == Q.Q4_1:
        lines.append(f"  float xs[{t}][{nb}];")
        lines.append(
            f"  for (int i = 0; i < {t}; i++) for (int b = 0; b < {nb}; b++)"
            f" xs[i][b] = hsum(ldx(x + i * {k} + b * 32) + ldx(x + i * {k} + b * 32 + 16));"
        )
    lines.append("  for (int r = r0; r < r1; r++) {")
    lines.append(f"    const long bp0 = (long)r * {nb};")
    for i in range(t):
        lines.append(f"    f32x16 acc0_{i} = {{0}};" + (f" float macc0_{i} = 0.0f;" if qt == Q.Q4_1 else ""))
    lines.append(f"    for (int b = 0; b < {nb}; b++) {{")
    if PREFETCH:
        qb = 32 if qt == Q.Q8_0 else 16
        lines.append(f"      __builtin_prefetch((const char *)qs + (bp0 + b) * {qb} + {PREFETCH});")
    avx512 = PERMUTE and qt in _BLOCK_AVX512

    def block(template: str, half_to_float: str) -> list[str]:
        # the T=1 block's dequantisation once, then its accumulation for each x row (xl{i}, xh{i}, xs[i])
        out = [template.split("acc{j} +=", 1)[0].format(j=0).rstrip()]
        for i in range(t):
            out.append(f"        acc0_{i} += d[bp0 + b] * (lo * xl{i} + hi * xh{i});")
            if qt == Q.Q4_1:
                out.append(f"        macc0_{i} += {half_to_float}(m[bp0 + b]) * xs[{i}][b];")
        out.append("      }")
        return out

    for i in range(t):
        lines.append(f"      f32x16 xl{i} = ldx(x + {i * k} + b * 32), xh{i} = ldx(x + {i * k} + b * 32 + 16);")
    if avx512:
        lines.append("#if defined(__AVX512F__)")
        lines.extend(block(_BLOCK_AVX512[qt], "_cvtsh_ss"))
        lines.append("#else")
    lines.extend(block(_BLOCK[qt], "h2f"))
    if avx512:
        lines.append("#endif")
    lines.append("    }")
    for i in range(t):
        tail = f" + macc0_{i}" if qt == Q.Q4_1 else ""
        lines.append(f"    out[{i * n} + r] = hsum(acc0_{i}){tail};")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# T > 1 (prefill): one block of a weight row is dequantised once into two scaled float vectors and used for TILE
# rows of x (TILE accumulators), instead of once per x row
TILE = 8

_DEQUANT = {  # weight row j, block b -> wl{j}, wh{j}: its 32 floats (scaled), as two 16-lane vectors
    Q.Q4_0: """
        u8x16 q{j} = ldq(qs + (bp{j} + b) * 16); const float d{j} = d[bp{j} + b];
        f32x16 wl{j} = __builtin_convertvector((i8x16)(q{j} & 15) - 8, f32x16) * d{j};
        f32x16 wh{j} = __builtin_convertvector((i8x16)(q{j} >> 4) - 8, f32x16) * d{j};""",
    Q.Q4_1: """
        u8x16 q{j} = ldq(qs + (bp{j} + b) * 16); const float d{j} = d[bp{j} + b], m{j} = h2f(m[bp{j} + b]);
        f32x16 wl{j} = __builtin_convertvector(q{j} & 15, f32x16) * d{j} + m{j};
        f32x16 wh{j} = __builtin_convertvector(q{j} >> 4, f32x16) * d{j} + m{j};""",
    Q.Q8_0: """
        const signed char *p{j} = qs + (bp{j} + b) * 32; const float d{j} = d[bp{j} + b];
        f32x16 wl{j} = __builtin_convertvector(ldi(p{j}), f32x16) * d{j};
        f32x16 wh{j} = __builtin_convertvector(ldi(p{j} + 16), f32x16) * d{j};""",
}
_DEQUANT_AVX512 = {
    Q.Q4_0: """
        __m512i q{j} = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + (bp{j} + b) * 16)));
        const float d{j} = d[bp{j} + b];
        f32x16 wl{j} = (f32x16)_mm512_permutexvar_ps(q{j}, tbl) * d{j};
        f32x16 wh{j} = (f32x16)_mm512_permutexvar_ps(_mm512_srli_epi32(q{j}, 4), tbl) * d{j};""",
    Q.Q4_1: """
        __m512i q{j} = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + (bp{j} + b) * 16)));
        const float d{j} = d[bp{j} + b], m{j} = _cvtsh_ss(m[bp{j} + b]);
        f32x16 wl{j} = (f32x16)_mm512_permutexvar_ps(q{j}, tbl) * d{j} + m{j};
        f32x16 wh{j} = (f32x16)_mm512_permutexvar_ps(_mm512_srli_epi32(q{j}, 4), tbl) * d{j} + m{j};""",
}


def c_source_batched(name: str, qt, n: int, k: int, t: int, slots: list[str], slices: int) -> str:
    """C source of `name`: y[T, N] = x[T, K] W[N, K]^T for the rows (N) of slice core_id of `slices`:
    BROWS weight rows x TILE rows of x per pass (each x load serves BROWS rows, each dequantised block TILE)."""
    nb = k // 32
    lines = _opening(name, qt, n, slots, slices)
    lines.append("  int r = r0;")

    def dequant(j: int) -> list[str]:
        if PERMUTE and qt in _DEQUANT_AVX512:
            avx = _DEQUANT_AVX512[qt].format(j=j)
            return ["#if defined(__AVX512F__)", avx, "#else", _DEQUANT[qt].format(j=j), "#endif"]
        return [_DEQUANT[qt].format(j=j)]

    def rows_loop(rb: int) -> None:
        lines.append(f"  for (; r + {rb} <= r1; r += {rb}) {{")
        lines.append("    " + " ".join(f"const long bp{j} = (long)(r + {j}) * {nb};" for j in range(rb)))
        for t0 in range(0, t, TILE):
            tt = min(TILE, t - t0)
            lines.append("    {")
            lines.append(
                "      " + " ".join(f"f32x16 a{j}_{i} = {{0}};" for j in range(rb) for i in range(tt))
            )
            lines.append(f"      for (int b = 0; b < {nb}; b++) {{")
            for j in range(rb):
                lines.extend(dequant(j))
            for i in range(tt):
                xo = f"x + {(t0 + i) * k} + b * 32"
                lines.append(f"        {{ f32x16 xl = ldx({xo}), xh = ldx({xo} + 16);")
                for j in range(rb):
                    lines.append(
                        f"          a{j}_{i} = a{j}_{i} + wl{j} * xl; a{j}_{i} = a{j}_{i} + wh{j} * xh;"
                    )
                lines.append("        }")
            lines.append("      }")
            for i in range(tt):
                for j in range(rb):
                    lines.append(f"      out[{(t0 + i) * n} + r + {j}] = hsum(a{j}_{i});")
            lines.append("    }")
        lines.append("  }")

    rows_loop(BROWS)
    if BROWS > 1:
        rows_loop(1)
    lines.append("}")
    return "\n".join(lines) + "\n"


BROWS = 2


def c_source_q4k(name: str, n: int, k: int, slots: list[str], slices: int) -> str:
    """Q4_K, T=1. Parts: dm (n, nsb, 2) float32 d/dmin; scm (n, nsb, 2, 8) 6-bit scales then mins, a byte each;
    qs (n, nsb, 4, 32): element 64j + 32h + i of a super-block is nibble h of qs[j, i] (sub-block 2j + h).
    w = d*sc[s]*q - dmin*mn[s]: the min term is dmin*mn[s]*sum(x over sub-block s) (sums made once per call)."""
    nsb, rows = k // 256, ROWS[Q.Q4_K]
    lines = [
        "#if defined(__AVX512F__)\n#include <immintrin.h>\n#endif",
        _PRELUDE,
        f"void {name}({_params(Q.Q4_K, slots)}) {{",
        "#if defined(__AVX512F__)",
        "  const __m512 tbl = _mm512_setr_ps(" + ", ".join(f"{i}.0f" for i in range(16)) + ");",
        "#endif",
        f"  const int r0 = (int)(((long)core_id * {n}) / {slices}), r1 = (int)(((long)(core_id + 1) * {n}) / {slices});",
        f"  float xs[{k // 32}];",
        f"  for (int b = 0; b < {k // 32}; b++) xs[b] = hsum(ldx(x + b * 32) + ldx(x + b * 32 + 16));",
        "  int r = r0;",
    ]
    nib = {
        True: (
            "(f32x16)_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q{c}), tbl)",
            "(f32x16)_mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_cvtepu8_epi32(q{c}), 4), tbl)",
        ),
        False: ("__builtin_convertvector(q{c} & 15, f32x16)", "__builtin_convertvector(q{c} >> 4, f32x16)"),
    }

    def body(j: int, avx: bool) -> list[str]:
        lo, hi = nib[avx]
        qtype = "__m128i" if avx else "u8x16"
        load = "_mm_loadu_si128((const __m128i *)(p{c}))" if avx else "ldq(p{c})"
        out = [f"        {{ const unsigned char *p0 = qs + (sb{j} * 4 + jj) * 32, *p1 = p0 + 16;"]
        out.append("          " + " ".join(f"{qtype} q{c} = {load.format(c=c)};" for c in (0, 1)))
        out.append(f"          f32x16 lo = {lo.format(c=0)} * xl0 + {lo.format(c=1)} * xl1;")
        out.append(f"          f32x16 hi = {hi.format(c=0)} * xh0 + {hi.format(c=1)} * xh1;")
        out.append(f"          acc{j} += sc{j}[2 * jj] * lo + sc{j}[2 * jj + 1] * hi; }}")
        return out

    def loop(count: int) -> None:
        lines.append(f"  for (; r + {count} <= r1; r += {count}) {{")
        for j in range(count):
            lines.append(f"    f32x16 acc{j} = {{0}}; f32x8 macc{j} = {{0}};")
        lines.append(f"    for (int b = 0; b < {nsb}; b++) {{")
        lines.append("      f32x8 xsv; __builtin_memcpy(&xsv, xs + b * 8, 32);")
        for j in range(count):
            lines.append(f"      const long sb{j} = (long)(r + {j}) * {nsb} + b;")
            lines.append(f"      const float d{j} = dm[sb{j} * 2], dmin{j} = dm[sb{j} * 2 + 1];")
            lines.append(f"      __builtin_prefetch((const char *)qs + sb{j} * 128 + {PREFETCH});")
            # the 8 sub-block scales (times d) and mins as vectors: no scalar conversions, no dependency chain
            lines.append(f"      u8x8 scb{j}, mnb{j}; __builtin_memcpy(&scb{j}, scm + sb{j} * 16, 8);")
            lines.append(f"      __builtin_memcpy(&mnb{j}, scm + sb{j} * 16 + 8, 8);")
            lines.append(f"      const f32x8 sc{j} = __builtin_convertvector(scb{j}, f32x8) * d{j};")
            lines.append(f"      macc{j} += __builtin_convertvector(mnb{j}, f32x8) * xsv * dmin{j};")
        for jj in range(4):  # unrolled: the scale lanes are constants
            lines.append("      {")
            lines.append(f"        const int jj = {jj}; const float *xb = x + b * 256 + {64 * jj};")
            lines.append(
                "        f32x16 xl0 = ldx(xb), xl1 = ldx(xb + 16), xh0 = ldx(xb + 32), xh1 = ldx(xb + 48);"
            )
            if PERMUTE:
                lines.append("#if defined(__AVX512F__)")
                for j in range(count):
                    lines.extend(body(j, True))
                lines.append("#else")
            for j in range(count):
                lines.extend(body(j, False))
            if PERMUTE:
                lines.append("#endif")
            lines.append("      }")
        lines.append("    }")
        for j in range(count):
            lines.append(
                f"    out[r + {j}] = hsum(acc{j}) - ((macc{j}[0] + macc{j}[4]) + (macc{j}[1] + macc{j}[5]) +"
            )
            lines.append(f"                   (macc{j}[2] + macc{j}[6]) + (macc{j}[3] + macc{j}[7]));")
        lines.append("  }")

    loop(rows)
    if rows > 1:
        loop(1)
    lines.append("}")
    return "\n".join(lines) + "\n"


def c_source_q6k(name: str, n: int, k: int, slots: list[str], slices: int) -> str:
    """Q6_K, T=1. Parts: d (n, nsb) float32; sc (n, nsb, 16) int8; ql (n, nsb, 128); qh (n, nsb, 64). Element
    128a + 64b + 32c + 16h + i of a super-block: low 4 bits = nibble b of ql[64a + 32c + 16h + i], high 2 bits =
    bits 4b + 2c of qh[32a + 16h + i]; scale sc[8a + 4b + 2c + h]; w = d * sc * (q - 32)."""
    nsb, rows = k // 256, ROWS[Q.Q6_K]
    lines = [
        _PRELUDE,
        f"void {name}({_params(Q.Q6_K, slots)}) {{",
        f"  const int r0 = (int)(((long)core_id * {n}) / {slices}), r1 = (int)(((long)(core_id + 1) * {n}) / {slices});",
        "  int r = r0;",
    ]

    def loop(count: int) -> None:
        lines.append(f"  for (; r + {count} <= r1; r += {count}) {{")
        for j in range(count):
            lines.append(f"    f32x16 acc{j} = {{0}};")
        lines.append(f"    for (int s = 0; s < {nsb}; s++) {{")
        for j in range(count):
            lines.append(
                f"      const long sb{j} = (long)(r + {j}) * {nsb} + s; const float d{j} = d[sb{j}];"
            )
            lines.append(f"      const unsigned char *l{j} = ql + sb{j} * 128, *hb{j} = qh + sb{j} * 64;")
            lines.append(f"      const signed char *c{j} = sc + sb{j} * 16;")
            lines.append(f"      __builtin_prefetch((const char *)ql + sb{j} * 128 + {PREFETCH});")
            lines.append(f"      __builtin_prefetch((const char *)qh + sb{j} * 64 + {PREFETCH // 2});")
        for a in range(2):
            for c in range(2):
                for h in range(2):
                    for j in range(count):
                        lines.append(
                            f"      {{ u8x16 lo = ldq(l{j} + {64 * a + 32 * c + 16 * h}), hi = ldq(hb{j} + {32 * a + 16 * h});"
                        )
                        for b in range(2):
                            e = 128 * a + 64 * b + 32 * c + 16 * h
                            lines.append(
                                f"        {{ u8x16 q = ((lo >> {4 * b}) & 15) | (((hi >> {4 * b + 2 * c}) & 3) << 4);"
                            )
                            lines.append(
                                f"          acc{j} += (d{j} * c{j}[{8 * a + 4 * b + 2 * c + h}]) *"
                                f" (__builtin_convertvector((i8x16)q - 32, f32x16) * ldx(x + s * 256 + {e})); }}"
                            )
                        lines.append("      }")
        lines.append("    }")
        for j in range(count):
            lines.append(f"    out[r + {j}] = hsum(acc{j});")
        lines.append("  }")

    loop(rows)
    if rows > 1:
        loop(1)
    lines.append("}")
    return "\n".join(lines) + "\n"


_CLANG = {}


def _clang_renderer(renderer):
    from tinygrad.renderer.cstyle import ClangRenderer

    key = renderer.target
    if key not in _CLANG:
        _CLANG[key] = ClangRenderer(replace(renderer.target, renderer="CLANG"))
    return _CLANG[key]


def available() -> bool:
    """tinygrad's clang compiler (CC, default clang) is on PATH: without it the native bodies can't be built, and
    the engine keeps tinygrad's kernels (logged once, not warned per kernel)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        import logging
        import os
        import shutil

        _AVAILABLE = shutil.which(os.environ.get("CC", "clang")) is not None
        if not _AVAILABLE:
            logging.getLogger(__name__).info("no clang on PATH: tinygrad's own kernels for every weight type")
    return _AVAILABLE


_AVAILABLE: bool | None = None


def supported(qt, n: int, k: int, t: int) -> bool:
    if not available():
        return False
    if qt in (Q.Q4_K, Q.Q6_K):
        return t == 1 and k % 256 == 0
    return (t == 1 or BATCHED) and qt in NATIVE_TYPES and k % 32 == 0 and n >= 1


BATCHED = True  # T > 1 too (c_source_batched)


def program_for(ast, renderer, qt, n: int, k: int, slots: list[str], t: int = 1):
    """A compiled PROGRAM UOp running our C body with the signature tinygrad gives `ast` (a SINK with opts)."""
    from tinygrad.codegen import to_program
    from tinygrad.uop.ops import Ops, UOp

    clang = _clang_renderer(renderer)
    prg = to_program(ast, clang)  # tinygrad's own kernel: its signature, slices and argument order
    info = prg.arg
    src = prg.src[2].arg
    m = re.search(r"void\s+(\w+)\(([^)]*)\)", src)
    if m is None or m.group(1) != info.function_name:
        raise RuntimeError("cannot find the kernel signature in tinygrad's source")
    names = [p.strip().split()[-1] for p in m.group(2).split(",")]
    if len(names) != len(slots) + (1 if info.vars else 0):
        raise RuntimeError(f"unexpected kernel parameters {names} for slots {slots}")
    if info.vars and (len(info.vars) != 1 or info.vars[0].expr != "core_id"):
        raise RuntimeError(f"unexpected kernel variables {info.vars}")
    slices = int(info.global_size[0]) if info.vars else 1

    def source(slices: int) -> str:
        if qt == Q.Q4_K:
            return c_source_q4k(info.function_name, n, k, slots, slices)
        if qt == Q.Q6_K:
            return c_source_q6k(info.function_name, n, k, slots, slices)
        if t == 1:
            return c_source(info.function_name, qt, n, k, slots, slices)
        if t <= ROWS_MAX_T:
            return c_source_rows(info.function_name, qt, n, k, t, slots, slices)
        return c_source_batched(info.function_name, qt, n, k, t, slots, slices)

    if not info.vars:  # one slice: still take core_id (always 0 here) so one body serves both
        csrc = source(1).replace(", const int core_id) {", ") {\n  const int core_id = 0;", 1)
    else:
        csrc = source(slices)
    binary = clang.compiler.compile_cached(csrc)
    return prg.replace(src=(prg.src[0], prg.src[1], UOp(Ops.SOURCE, arg=csrc), UOp(Ops.BINARY, arg=binary)))


# ---------------------------------------------------------------------- decode attention (T=1)
_ATTN_PRELUDE = r"""
typedef int i32x16 __attribute__((vector_size(64)));
static inline f32x16 vexp(f32x16 x) { /* e^x for x <= 0: 2^k * e^f, |f| <= ln2/2, Taylor to f^7 (rel err < 1e-7) */
  const f32x16 lim = (f32x16){0} - 87.0f;
  i32x16 xb, lb, c = x < lim;
  __builtin_memcpy(&xb, &x, 64); __builtin_memcpy(&lb, &lim, 64);
  xb = (xb & ~c) | (lb & c); /* x = max(x, -87): 2^k stays a normal float */
  __builtin_memcpy(&x, &xb, 64);
  f32x16 t = x * 1.4426950408889634f - 0.5f;
  i32x16 k = __builtin_convertvector(t, i32x16); /* toward zero: t <= 0, so round to nearest of t + 0.5 */
  f32x16 f = x - __builtin_convertvector(k, f32x16) * 0.6931471805599453f;
  f32x16 p = (f32x16){0} + 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f; p = p * f + 1.0f / 120.0f; p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f; p = p * f + 0.5f; p = p * f + 1.0f; p = p * f + 1.0f;
  i32x16 e = (k + 127) << 23;
  f32x16 s; __builtin_memcpy(&s, &e, 64);
  return p * s;
}
"""


def attention_source(name: str, params: list[str], heads: int, kv_heads: int, head_dim: int, positions: int,
                     scale: float, slices: int, t: int = 1) -> str:  # fmt: skip
    """softmax(q K^T * scale) V for each query head of slice core_id and each of the T query rows (row i at
    position start_pos + i, causal: it sees KV positions 0..start_pos + i). q (heads, T, head_dim), out
    (T, heads, head_dim)."""
    hv, group = head_dim // 16, heads // kv_heads
    cap = (positions + 15) // 16 * 16
    body = f"""
void {name}({", ".join(params)}) {{
  const int h0 = (core_id * {heads}) / {slices}, h1 = ((core_id + 1) * {heads}) / {slices};
  float s[{cap}];
  for (int h = h0; h < h1; h++) for (int t = 0; t < {t}; t++) {{
    const int n = start_pos + t + 1;
    const int g = h / {group};
    const float *qh = q + (h * {t} + t) * {head_dim};
    const float *K = kv + (long)g * {positions * head_dim}, *V = kv + (long)({kv_heads} + g) * {positions * head_dim};
    f32x16 qv[{hv}], o[{hv}];
    for (int i = 0; i < {hv}; i++) {{ qv[i] = ldx(qh + 16 * i) * {scale!r}f; o[i] = (f32x16){{0}}; }}
    float mx = -3.0e38f;
    for (int p = 0; p < n; p++) {{
      const float *kp = K + (long)p * {head_dim};
      f32x16 a = qv[0] * ldx(kp);
      for (int i = 1; i < {hv}; i++) a += qv[i] * ldx(kp + 16 * i);
      float v = hsum(a);
      s[p] = v;
      mx = v > mx ? v : mx;
    }}
    for (int p = n; p < ((n + 15) & ~15); p++) s[p] = mx;
    float sum = 0.0f;
    for (int p = 0; p < n; p += 16) {{
      f32x16 e = vexp(ldx(s + p) - mx);
      __builtin_memcpy(s + p, &e, 64);
    }}
    for (int p = 0; p < n; p++) sum += s[p];
    for (int p = 0; p < n; p++) {{
      const float *vp = V + (long)p * {head_dim};
      const float w = s[p];
      for (int i = 0; i < {hv}; i++) o[i] += w * ldx(vp + 16 * i);
    }}
    const float inv = 1.0f / sum;
    for (int i = 0; i < {hv}; i++) {{ f32x16 r = o[i] * inv; __builtin_memcpy(out + (t * {heads} + h) * {head_dim} + 16 * i, &r, 64); }}
  }}
}}
"""
    return _PRELUDE + _ATTN_PRELUDE + body


_ATTN: dict = {}


def attention(
    q, kv, start_pos, heads: int, kv_heads: int, head_dim: int, scale: float, threads: int, t: int = 1
):
    """Causal attention over the KV cache as one native kernel: q (heads*T*head_dim,) float32 after rotary
    ((heads, T, head_dim) flattened), kv the layer's cache (2, kv_heads, positions, head_dim) float32 (this
    chunk's K/V already stored), start_pos the bound position variable of q's first row. Returns
    (T*heads*head_dim,) float32 ((T, heads, head_dim) flattened), or None where this kernel does not apply
    (then the caller writes attention in tinygrad)."""
    from tinygrad import Tensor, dtypes

    if (
        head_dim % 16
        or heads % kv_heads
        or kv.dtype != dtypes.float32
        or not USE_ATTENTION
        or not available()
    ):
        return None
    positions = kv.shape[2]
    var = start_pos.unbind()[0].expr  # the kernel reads its position by name: a batch has one per session
    key = (heads, kv_heads, head_dim, positions, scale, threads, t, q.device, var)
    if key not in _ATTN:
        try:
            _ATTN[key] = _attention_program(
                q.device, start_pos, heads, kv_heads, head_dim, positions, scale, threads, t
            )
        except Exception as e:
            import warnings

            warnings.warn(f"native attention unavailable ({e!r}); using tinygrad's", stacklevel=2)
            _ATTN[key] = None
    built = _ATTN[key]
    if built is None:
        return None
    prg, slots = built
    srcs = {
        "out": Tensor.empty(t * heads * head_dim, dtype=dtypes.float32, device=q.device),
        "q": q,
        "kv": kv,
    }
    outs = Tensor.custom_kernel(*[srcs[s] for s in slots], fxn=lambda *_: prg)
    return outs[slots.index("out")]


USE_ATTENTION = True


def _attention_program(device, start_pos, heads, kv_heads, head_dim, positions, scale, threads, t):
    """A one-kernel tinygrad expression with the same buffers and variables (out, q, kv; start_pos, core_id),
    scheduled and rendered for its signature; then our body compiled in its place (as program_for does)."""
    from tinygrad import Device, Tensor, dtypes
    from tinygrad.codegen import to_program
    from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
    from tinygrad.codegen.opt.postrange import Scheduler
    from tinygrad.engine import realize
    from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

    from .quant import _preprocess

    group = heads // kv_heads
    qd = Tensor.empty(t * heads * head_dim, dtype=dtypes.float32, device=device)
    kd = Tensor.empty(2, kv_heads, positions, head_dim, dtype=dtypes.float32, device=device)
    one = kd[0:1, 0:1, start_pos : start_pos + 1, 0:1].reshape(1)  # reads kv at start_pos: the variable
    y = qd.reshape(kv_heads, group * t, head_dim) + one.reshape(1, 1, 1).expand(kv_heads, group * t, head_dim)
    y = y.reshape(t * heads * head_dim)
    saved, realize.capturing[:] = list(realize.capturing), []
    try:
        lin, _ = y.linear_with_vars()
    finally:
        realize.capturing[:] = saved
    calls = [c for c in lin.src if c.op is Ops.CALL]
    if len(calls) != 1:
        raise RuntimeError(f"expected one kernel, got {len(calls)}")
    call = calls[0]
    ast = call.src[0]
    by_buffer = {id(qd.uop.buffer): "q", id(kd.uop.buffer): "kv", id(y.uop.buffer): "out"}
    slots = [by_buffer[id(a.buffer)] for a in call.src[1:]]
    if sorted(slots) != ["kv", "out", "q"]:
        raise RuntimeError(f"unexpected kernel arguments {slots}")
    ren = Device[device].renderer
    k = Scheduler(_preprocess(ast), ren)
    k.convert_loop_to_global()
    opts = []
    if threads > 1 and ren.has_threads:
        for n in range(min(threads, heads), 1, -1):
            axes = [a for a in k.axes_of(AxisType.GLOBAL, AxisType.WEAK) if k.full_shape[a] % n == 0]
            try:
                if axes:
                    k.apply_opt(Opt(OptOps.THREAD, axes[0], n))
                    opts.append(Opt(OptOps.THREAD, axes[0], n))
                    break
            except KernelOptError:
                continue
    ast = ast.replace(arg=KernelInfo(name="attn_decode", opts_to_apply=tuple(opts)))
    clang = _clang_renderer(ren)
    prg = to_program(ast, clang)
    info = prg.arg
    m = re.search(r"void\s+(\w+)\(([^)]*)\)", prg.src[2].arg)
    if m is None or m.group(1) != info.function_name:
        raise RuntimeError("cannot find the kernel signature in tinygrad's source")
    var_names = {v.arg.slot: v.expr for v in info.vars}
    params = []
    for p in m.group(2).split(","):
        pname = p.strip().split()[-1]
        slot = int(re.match(r"data(\d+)_", pname).group(1))
        if slot in var_names:  # the position variable's name varies (one per session of a batch); its role not
            params.append("const int core_id" if var_names[slot] == "core_id" else "const int start_pos")
        else:
            params.append(
                ("float* restrict " if slots[slot] == "out" else "const float* restrict ") + slots[slot]
            )
    positions_vars = [v for v in var_names.values() if v != "core_id"]
    if len(positions_vars) != 1 or not positions_vars[0].startswith("start_pos"):
        raise RuntimeError(f"unexpected kernel variables {var_names}")
    slices = int(info.global_size[0]) if "core_id" in var_names.values() else 1
    if slices == 1 and "core_id" not in var_names.values():
        params_src = ", ".join(params)
        src = attention_source(info.function_name, params, heads, kv_heads, head_dim, positions, scale, 1, t)
        src = src.replace(f"({params_src}) {{", f"({params_src}) {{\n  const int core_id = 0;", 1)
    else:
        src = attention_source(
            info.function_name, params, heads, kv_heads, head_dim, positions, scale, slices, t
        )
    binary = clang.compiler.compile_cached(src)
    return prg.replace(
        src=(prg.src[0], prg.src[1], UOp(Ops.SOURCE, arg=src), UOp(Ops.BINARY, arg=binary))
    ), slots
