// CPU kernels of the query-to-patch attention, written once over GCC vector types of
// FS_VEC_BYTES bytes and compiled once per instruction set: attention_cpu.cpp includes this
// file inside namespace flashsloth::attention::<isa>, under the matching
// `#pragma GCC target`. No include guard, on purpose; and no #include here, so that only this
// file's own functions take the region's target (every header is included before).
//
// Forward: lanes over keys (see the section "Forward" below). Backward: the vector lanes hold
// queries (W of them per query block), so every loop over keys and head dims is a run of
// lane-wide FMAs with one broadcast operand, reading K and V rows contiguously; keys stream in
// chunks of kChunk that stay in L1 while every query block of the unit uses them.
// Both: s = (q . k) * scale accumulated in the accumulation type (fp32 for 16-bit inputs);
// probabilities are exp2 of s * log2(e) minus the row's max (or lse) in the same units.
// Masked keys are skipped (gathered out of the chunk by index), never read.

static constexpr int64_t kChunk = 64;   // keys per chunk (K + V chunk ~14 KB in fp32 at 18/36)
static constexpr int kGroup = 8;         // lane buffer of the backward (2 x kGroup lane vectors)

template <typename A> struct VecOf;
template <> struct VecOf<float> {
  typedef float type __attribute__((vector_size(FS_VEC_BYTES)));
  typedef int32_t itype __attribute__((vector_size(FS_VEC_BYTES)));
};
template <> struct VecOf<double> {
  typedef double type __attribute__((vector_size(FS_VEC_BYTES)));
  typedef int64_t itype __attribute__((vector_size(FS_VEC_BYTES)));
};

template <typename A> using Vec = typename VecOf<A>::type;
template <typename A> constexpr int lanes() { return FS_VEC_BYTES / int(sizeof(A)); }

// x - 0 (not 0 + x, which is not x for x = -0.0) so GCC folds it to a plain broadcast,
// which then becomes the memory operand of the FMA.
template <typename A> static inline Vec<A> vset(A x) { return x - Vec<A>{}; }
template <typename A> static inline Vec<A> vload(const A* p) {
  Vec<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A> static inline void vstore(A* p, Vec<A> v) { std::memcpy(p, &v, sizeof(v)); }
// The first n (1..W) lanes of v to p: a masked store for fp32 on AVX-512; on AVX2 4-, 2- and
// 1-lane stores (vmaskmovps stores are microcoded and slow on AMD; the lane loop below, which
// GCC made a memcpy call through the stack, had cost ~6% of the AVX2 backward); a lane loop
// otherwise.
template <typename A> static inline void vstore_n(A* p, Vec<A> v, int n) {
  if (n == lanes<A>()) return vstore(p, v);
#if FS_VEC_BYTES == 64
  if constexpr (std::is_same<A, float>::value) {
    _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), (__m512)v);
    return;
  }
#elif FS_VEC_BYTES == 32
  if constexpr (std::is_same<A, float>::value) {
    __m128 x = _mm256_castps256_ps128((__m256)v);
    if (n >= 4) {
      _mm_storeu_ps(p, x);
      p += 4;
      n -= 4;
      x = _mm256_extractf128_ps((__m256)v, 1);
    }
    if (n >= 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), x);
      p += 2;
      n -= 2;
      x = _mm_movehl_ps(x, x);
    }
    if (n == 1) _mm_store_ss(p, x);
    return;
  }
#endif
  for (int l = 0; l < n; ++l) p[l] = v[l];
}
// The first n (1..W) lanes of p, the others 0: a masked load for fp32 on AVX-512 / AVX2 (never
// past p + n), a lane loop below.
template <typename A> static inline Vec<A> vload_n(const A* p, int n) {
  if (n == lanes<A>()) return vload(p);
#if FS_VEC_BYTES == 64
  if constexpr (std::is_same<A, float>::value)
    return (Vec<A>)_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p);
#elif FS_VEC_BYTES == 32
  if constexpr (std::is_same<A, float>::value)
    return (Vec<A>)_mm256_maskload_ps(
        p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
#endif
  Vec<A> v{};
  for (int l = 0; l < n; ++l) v[l] = p[l];
  return v;
}
template <typename A> static inline Vec<A> vmax(Vec<A> a, Vec<A> b) { return a > b ? a : b; }

// 2^f for f in [-0.5, 0.5]: a degree-5 polynomial with p(0) = 1 exactly, fitted for the least
// maximum relative error (Lawson's iteration): 1.67e-7 evaluated in fp32 by FMAs, against
// 2.18e-7 for the degree-6 Taylor polynomial it replaced, with one FMA less per vector.
// (Templated on the vector type: the 256-bit query lanes below take it on 8 lanes.)
template <typename VF>
__attribute__((always_inline)) static inline VF exp2_poly(VF f) {
  VF p = VF{} + 1.326472731e-3f;
  p = p * f + 9.671512991e-3f;
  p = p * f + 5.550733581e-2f;
  p = p * f + 2.402224243e-1f;
  p = p * f + 6.931470037e-1f;
  p = p * f + 1.0f;
  return p;
}

// 2^x, exactly 0 for x < -126 (so -inf, a masked or all-masked logit, gives 0 and never NaN).
// Round to nearest (the 1.5 * 2^23 trick), then exp2_poly(f) times 2^n built in the exponent
// bits. Always inlined: called out of line (GCC's choice at -O3) it cost ~10% of the forward.
__attribute__((always_inline)) static inline Vec<float> vexp2(Vec<float> x) {
#if FS_VEC_BYTES == 64
  // The same function in 11 instructions instead of ~18: round by vrndscaleps, 2^n by
  // vscalefps (exact, as the multiply below), and the zero for x < -126 by the scalef's mask
  // (NLT_UQ is true for NaN, which stays NaN).
  const __m512 xv = _mm512_min_ps(_mm512_set1_ps(127.0f), (__m512)x);  // NaN stays NaN
  const __m512 n512 = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec<float> f = (Vec<float>)xv - (Vec<float>)n512;
  const Vec<float> p = exp2_poly(f);
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  return (Vec<float>)_mm512_maskz_scalef_ps(keep, (__m512)p, n512);
#else
  typedef VecOf<float>::itype VI;
  const Vec<float> lo = vset<float>(-126.0f), hi = vset<float>(127.0f);
  const Vec<float> magic = vset<float>(12582912.0f);
  Vec<float> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const Vec<float> t = xc + magic;
  const Vec<float> f = xc - (t - magic);
  const VI n = (VI)t - (VI)magic;
  const Vec<float> p = exp2_poly(f);
  const Vec<float> r = p * (Vec<float>)((n + 127) << 23);
  return x < lo ? Vec<float>{} : r;
#endif
}

// float64 runs for gradcheck, not for speed: libm per lane.
static inline Vec<double> vexp2(Vec<double> x) {
  Vec<double> r;
  for (int i = 0; i < lanes<double>(); ++i) r[i] = std::exp2(x[i]);
  return r;
}

// Element loads into the accumulation type and stores back. The half conversion is the
// branch-free one of c10 (fp16_ieee_to_fp32_value), so conversion loops vectorise.
static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float load_elem(const float* p) { return *p; }
static inline double load_elem(const double* p) { return *p; }
static inline float load_elem(const c10::BFloat16* p) {
  return bits_to_float(uint32_t(p->x) << 16);
}
static inline float load_elem(const c10::Half* p) {
  const uint32_t w = uint32_t(p->x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_float(sign | (two_w < (1u << 27) ? float_to_bits(denormalized)
                                                   : float_to_bits(normalized)));
}
static inline void store_elem(float* p, float x) { *p = x; }
static inline void store_elem(double* p, double x) { *p = x; }
// fp32 -> fp16 (round to nearest even; overflow to inf, NaN kept), W lanes at a time: the
// algorithm of c10's fp16_ieee_from_fp32_value (the float unit does the rounding) on lane
// vectors. c10::Half(float) is a scalar call when F16C is not enabled at compile time, and it
// made the fp16 backward 2.5x slower than the bf16 one through the dk / dv write-out.
typedef uint32_t VecU32 __attribute__((vector_size(FS_VEC_BYTES)));
typedef uint16_t VecU16 __attribute__((vector_size(FS_VEC_BYTES / 2)));
static inline VecU32 vsplat(uint32_t x) { return VecU32{} + x; }
static inline void store_half_vec(c10::Half* dst, Vec<float> f) {
  const VecU32 w = (VecU32)f;
  const Vec<float> absf = (Vec<float>)(w & vsplat(0x7FFFFFFFu));
  Vec<float> base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  const VecU32 shl1_w = w + w;
  const VecU32 sign = w & vsplat(0x80000000u);
  VecU32 bias = shl1_w & vsplat(0xFF000000u);
  bias = bias < vsplat(0x71000000u) ? vsplat(0x71000000u) : bias;
  base = (Vec<float>)((bias >> 1) + vsplat(0x07800000u)) + base;
  const VecU32 bits = (VecU32)base;
  const VecU32 nonsign = ((bits >> 13) & vsplat(0x00007C00u)) + (bits & vsplat(0x00000FFFu));
  const VecU32 h = (sign >> 16) | (shl1_w > vsplat(0xFF000000u) ? vsplat(0x7E00u) : nonsign);
  const VecU16 out = __builtin_convertvector(h, VecU16);
  std::memcpy(dst, &out, sizeof(out));
}
static inline void store_elem(c10::Half* p, float x) { *p = c10::Half(x); }
static inline void store_elem(c10::BFloat16* p, float x) { *p = c10::BFloat16(x); }

// dst[0:n] = src[0:n] * mul, converted to dst's dtype (fp16: W lanes at a time). Never inlined:
// once GCC inlined the fp16 one into the fp16 forward (after 8a7a428 grew this file), that
// forward took 0.426 -> 0.582 ms at B = 1, Lq = 9, Lk = 729 on Zen 4 (1 thread, medians of 4
// interleaved processes; B = 16 8.1 -> 8.3 ms); it runs once per output row.
template <typename T, typename A>
__attribute__((noinline)) static void store_row(T* dst, const A* src, int64_t n, A mul) {
  int64_t d = 0;
  if constexpr (std::is_same<T, c10::Half>::value) {
    for (; d + lanes<A>() <= n; d += lanes<A>()) store_half_vec(dst + d, vload(src + d) * mul);
  }
  for (; d < n; ++d) store_elem(dst + d, src[d] * mul);
}

// Per-thread scratch, grown on demand and reused across calls (no allocation once warm),
// 64-byte aligned so lane vectors never split a cache line.
template <typename A>
static A* scratch(int64_t n) {
  static thread_local std::vector<A> buf;
  const size_t need = size_t(n) + 64 / sizeof(A);
  if (buf.size() < need) buf.resize(need);
  uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  p = (p + 63) & ~uintptr_t(63);
  return reinterpret_cast<A*>(p);
}

// A vector of W elements of type S (A itself, or bf16 / fp16 for float: converted in
// registers, vcvtph2ps / a shift, so P x V reads 16-bit V rows in place).
template <typename A, typename S>
static inline Vec<A> vload_as(const S* p) {
  if constexpr (std::is_same<S, A>::value) {
    return vload(p);
  } else {
    static_assert(std::is_same<A, float>::value, "16-bit sources accumulate in float");
#if FS_VEC_BYTES == 64
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same<S, c10::Half>::value) return (Vec<A>)_mm512_cvtph_ps(h);
    else return (Vec<A>)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif FS_VEC_BYTES == 32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same<S, c10::Half>::value) return (Vec<A>)_mm256_cvtph_ps(h);
    else return (Vec<A>)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    Vec<A> v;
    for (int l = 0; l < lanes<A>(); ++l) v[l] = load_elem(p + l);
    return v;
#endif
  }
}

// dst[e] = src[e] in the accumulation type for e < n: 16-bit rows a vector at a time by
// vload_as on AVX2 / AVX-512 (the hardware conversion for fp16: c10's branch-free software
// conversion, ~12 vector instructions per vector, had made the fp16 forward ~23% slower than
// the fp32 one on Zen 4).
template <typename T, typename A>
static inline void load_row(A* dst, const T* src, int64_t n) {
  int64_t e = 0;
  if constexpr (!std::is_same<T, A>::value && std::is_same<A, float>::value &&
                FS_VEC_BYTES >= 32) {
    constexpr int W = lanes<A>();
    for (; e + W <= n; e += W) vstore(dst + e, vload_as<A>(src + e));
  }
  for (; e < n; ++e) dst[e] = load_elem(src + e);
}

template <typename T, typename A>
static inline const A* chunk_rows(const T* src, int64_t rows, int64_t cols, A* buf) {
  if constexpr (std::is_same<T, A>::value) {
    return src;
  } else {
    load_row(buf, src, rows * cols);
    return buf;
  }
}

// Number of keys of chunk [c0, c0 + kc) that are attended, their offsets written to idx.
static inline int gather_keys(const bool* mrow, int64_t c0, int64_t kc, int32_t* idx) {
  int nv = 0;
  if (mrow == nullptr) {
    for (int64_t j = 0; j < kc; ++j) idx[j] = int32_t(j);
    return int(kc);
  }
  for (int64_t j = 0; j < kc; ++j)
    if (mrow[c0 + j]) idx[nv++] = int32_t(j);
  return nv;
}

// ---------------------------------------------------------------------------------------------
// Forward: lanes over keys.
//
// Roofline of the EmbQ shape (Lq = 9, Dk = 18, Dv = 36, fp32): 216 bytes of K and V per key
// and head against 9 x 54 multiply-adds, so the kernel must spend only a few cycles per key.
// The work per key chunk (kKeyVecs lane vectors of attended keys, gathered by index so masked
// keys are never read):
//   1. K^T of the chunk (register transposes, see transpose_keys; K rows converted to fp32
//      first for bf16 / fp16), so each lane holds one key;
//   2. scores of every query of the unit as a small register GEMM (kScoreQ queries x the
//      chunk's key vectors of accumulators; one broadcast q element feeds a row of FMAs),
//      s = (q . k) * scale in the accumulation type, then s + 0 * s (a +-inf score becomes
//      NaN, as the contract asks);
//   3. online softmax per query: one plain max per chunk (a NaN score it drops makes the
//      row's sum NaN, and the row NaN), the rescale factors of all queries by one vector exp2,
//      p = 2^((s - m) log2e) kept per lane (the row sum is reduced across lanes once, at the
//      end);
//   4. P x V with lanes over the value dims: every V row of the chunk is loaded once per
//      query group and feeds kPvQ x kPvD FMAs with broadcast p; fp32 V is read in place (a
//      tail that is not a lane multiple is covered by one vector ending at Dv, overlapping
//      the previous one; on AVX-512 a tail of 1-4 dims by a 4-lane vector, the narrow tail
//      below); bf16 / fp16 V rows at least a vector wide are read in place too
//      and converted in registers (vload_as) on AVX2 / AVX-512, narrower ones (and the
//      baseline's) are converted once into a zero-padded buffer.
// Lq = 1 costs Dk / W score FMAs per key instead of Dk (the query-lane layout left W - 1
// lanes idle); on AVX-512 (fp32) a single query replaces steps 1-2 by dot products over head
// dims with K rows read in place (dot_scores8). When the unit's queries fill more than half
// of their query blocks of W lanes (Lq = 9 with W = 16), steps 1-3 run with lanes over
// queries instead (K rows read in place, no gathers, no horizontal reductions) and only P x V
// keeps the value lanes: measured in cache on one loaded core, ~2.4x faster than the old
// query-lane kernel at Lq = 1 and 2, ~4% at Lq = 9 and 17 (where the old layout was already
// dense in the score GEMM). On AVX-512 (fp32 accumulation, not the bf16 dot path) a unit of
// 8k + 1 such queries (Lq = 9) takes blocks of 8 queries in 256-bit lanes and its last query
// by dot products (score_q8). K and V rows kPrefetchKeys ahead are prefetched when the call's
// K and V exceed the cache (P.prefetch): K during the scores, V during P x V (RowPrefetch).
// ---------------------------------------------------------------------------------------------

// key vectors per chunk of the baseline and AVX2 (64 keys on AVX2: its per-chunk work, a
// horizontal max per query and the rescale, had cost ~10% at Lq = 9 with 32-key chunks), and
// per score tile of the baseline and AVX-512
static constexpr int kKeyVecs = FS_VEC_BYTES == 32 ? 8 : 4;
// keys per chunk. AVX-512: 256, whose per-chunk work (rescale, max, the P x V tiles'
// accumulators loaded and stored, the single query's softmax) 64-key chunks had repeated four
// times as often. Measured in one process (kernel op, fp32, H = 32, Lk = 729, 2 threads, 12-16
// interleaved rounds, time ratio 256 / 64 keys): B = 1 Lq = 9 0.908-0.913 (1 thread 0.911),
// Lq = 1 0.909, Lq = 2 0.883, Lq = 17 0.953; B = 16 Lq = 9 0.91-0.96, B = 4 Lk = 3645 0.96-0.97;
// B = 16 Lq = 1 (memory-bound) 0.96-1.04. 128 keys gained about half of that, 512 no more. The
// AVX2 kernels (measured forced on the same Zen 4) stay at 64: B = 1 0.92-0.98 with 256, but
// B = 16 Lq = 1 1.06-1.10.
static constexpr int64_t kChunkKeys =
    FS_VEC_BYTES == 64 ? 256 : int64_t(kKeyVecs) * (FS_VEC_BYTES / 4);
// How far ahead of the key a stage works on its prefetches go (P.prefetch), in keys: 192, as
// three 64-key chunks were; with 256-key chunks, three chunks ahead (768 keys) ran B = 16
// Lq = 1 1.03-1.10x slower.
static constexpr int64_t kPrefetchKeys = 3 * int64_t(kKeyVecs) * (FS_VEC_BYTES / 4);
static constexpr int kScoreQ = 4;  // queries per score tile
// key vectors per score tile of QG queries: QG x that many accumulators, which must leave
// registers for the tile's K vectors and the broadcast q (AVX2 has 16: 4 x 4 spilled)
template <int QG>
static constexpr int score_tile_keys() {
  if (FS_VEC_BYTES != 32) return kKeyVecs;
  return QG == 1 ? 8 : QG == 2 ? 4 : QG == 3 ? 3 : 2;
}
// queries per P x V tile, and the most that take three value vectors at a time: with 32
// vector registers (AVX-512) all 9 EmbQ queries x 3 value vectors stay in registers and each
// V row is loaded once; with 16, groups of at most 5 (15 accumulators + 3 loads would spill)
static constexpr int kPvQ = FS_VEC_BYTES == 64 ? 9 : 8;
static constexpr int kPv3Q = FS_VEC_BYTES == 64 ? 9 : 5;

// max that returns NaN when either operand is NaN (a > b ? a : b alone drops a NaN b or a).
template <typename A> static inline Vec<A> vmax_nan(Vec<A> a, Vec<A> b) {
  return ((a > b) | (a != a)) ? a : b;
}
template <typename A> static inline A max_nan(A a, A b) { return (a > b || a != a) ? a : b; }
// Horizontal max / sum by halving (log2(W) shuffles), not a lane-by-lane loop.
template <typename A> static inline Vec<A> vswap(Vec<A> v, int w) {
  typedef typename VecOf<A>::itype VI;
  VI m;
  for (int l = 0; l < lanes<A>(); ++l) m[l] = l ^ w;
  return __builtin_shuffle(v, m);
}
template <typename A> static inline A hmax(Vec<A> v) {
  for (int w = lanes<A>() / 2; w >= 1; w /= 2) v = vmax<A>(v, vswap<A>(v, w));
  return v[0];
}
template <typename A> static inline A hsum(Vec<A> v) {
  for (int w = lanes<A>() / 2; w >= 1; w /= 2) v = v + vswap<A>(v, w);
  return v[0];
}

// v[l] = base[off[l]]: a hardware gather for fp32 on AVX-512 / AVX2, a lane loop otherwise.
template <typename A> static inline Vec<A> vgather(const A* base, const int32_t* off) {
#if FS_VEC_BYTES == 64
  if constexpr (std::is_same<A, float>::value) {
    const __m512i o = _mm512_loadu_si512(static_cast<const void*>(off));
    return (Vec<A>)_mm512_i32gather_ps(o, static_cast<const void*>(base), 4);
  }
#elif FS_VEC_BYTES == 32
  if constexpr (std::is_same<A, float>::value) {
    const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off));
    return (Vec<A>)_mm256_i32gather_ps(base, o, 4);
  }
#endif
  Vec<A> v;
  for (int l = 0; l < lanes<A>(); ++l) v[l] = base[off[l]];
  return v;
}

// kt[d * cw + t * W + l] = kbase[koff[t * W + l] + d] for d < Dk, t < nkv: K^T of the chunk's
// attended keys, one key per lane. On AVX-512 (fp32) blocks of 16 dims go through an in-register
// 16 x 16 transpose (16 row loads, 64 shuffles, 16 stores per 16 keys) instead of 16 gathers
// (each ~16 load uops): the transposition had cost more than the score FMAs at Lq = 1 / 2.
// A tail of fewer than 8 dims is gathered, two dims per 64-bit element where it can (half the
// gathered elements: on Zen 4 the 16-lane gathers of Dk = 18's two tail dims took ~12% of the
// B = 1 Lq = 1 forward). Always inlined: out of line, the 16 rows went through the stack.
// On AVX2 (fp32) blocks of 4 dims of 8 keys are transposed in registers (8 half-row loads, 8
// shuffles, 4 stores): the 8-lane gathers had taken ~60% of the B = 1 Lq = 1 forward on AMD
// Zen 3 (perf), whose vgatherdps issues one element at a time.
#if FS_VEC_BYTES == 64
__attribute__((always_inline)) static inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + m], lane L (128 bits): dim 4L + m of keys 4i .. 4i + 3
  __m512 u[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // a 4 x 4 transpose of 128-bit blocks for each m: r[4L + m] = (u[m], u[4 + m], u[8 + m],
  // u[12 + m]) lane L each
  for (int m = 0; m < 4; ++m) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
    r[m] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + m] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + m] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}
#endif

// step(t) runs before key vector t is transposed (the caller's prefetch, spread over the work).
template <typename A, typename Step>
static inline void transpose_keys(const A* kbase, const int32_t* koff, int64_t Dk, int nkv,
                                  A* kt, int64_t cw, Step step) {
  constexpr int W = lanes<A>();
  int64_t dt = 0;  // dims [0, dt) go through the register transpose
#if FS_VEC_BYTES == 64
  if constexpr (std::is_same<A, float>::value) dt = Dk % 16 >= 8 ? Dk : Dk / 16 * 16;
#endif
  for (int t = 0; t < nkv; ++t) {
    step(t);
#if FS_VEC_BYTES == 64
    if constexpr (std::is_same<A, float>::value) {
      for (int64_t d0 = 0; d0 < dt; d0 += 16) {
        const int64_t nd = std::min<int64_t>(16, dt - d0);
        const __mmask16 m = __mmask16((1u << nd) - 1u);
        __m512 r[16];
        for (int l = 0; l < 16; ++l)
          r[l] = _mm512_maskz_loadu_ps(m, kbase + koff[t * W + l] + d0);  // never past a row
        transpose16(r);
        for (int64_t j = 0; j < nd; ++j) _mm512_storeu_ps(kt + (d0 + j) * cw + t * W, r[j]);
      }
    }
#endif
    int64_t d = dt;
#if FS_VEC_BYTES == 32
    if constexpr (std::is_same<A, float>::value) {
      // 4 dims of 8 keys at a time: row l's and row l + 4's dims in the halves of r[l], then
      // a 4 x 4 transpose within each half (8 shuffles). A last block of 1-3 dims is read by a
      // masked load, never past a row.
      const int32_t* o = koff + t * W;
      for (; d < Dk; d += 4) {
        const int nd = int(std::min<int64_t>(4, Dk - d));
        const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(nd), _mm_setr_epi32(0, 1, 2, 3));
        __m256 r[4];
        for (int l = 0; l < 4; ++l) {
          const float* lo = kbase + o[l] + d;
          const float* hi = kbase + o[l + 4] + d;
          r[l] = nd == 4 ? _mm256_set_m128(_mm_loadu_ps(hi), _mm_loadu_ps(lo))
                         : _mm256_set_m128(_mm_maskload_ps(hi, m), _mm_maskload_ps(lo, m));
        }
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]);  // k0d0 k1d0 k0d1 k1d1 | keys 4, 5
        const __m256 t1 = _mm256_unpackhi_ps(r[0], r[1]);  // dims 2, 3
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]);
        const __m256 t3 = _mm256_unpackhi_ps(r[2], r[3]);
        __m256 c[4];
        c[0] = _mm256_shuffle_ps(t0, t2, 0x44);
        c[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
        c[2] = _mm256_shuffle_ps(t1, t3, 0x44);
        c[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
        for (int j = 0; j < nd; ++j) _mm256_storeu_ps(kt + (d + j) * cw + t * W, c[j]);
      }
    }
#endif
#if FS_VEC_BYTES == 64
    if constexpr (std::is_same<A, float>::value)
      for (; d + 2 <= Dk; d += 2) {
        // (dim d, dim d + 1) of 8 keys per 64-bit gather, then even / odd floats apart
        const __m256i o0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(koff + t * W));
        const __m256i o1 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(koff + t * W + 8));
        const __m512 g0 = _mm512_castpd_ps(_mm512_i32gather_pd(o0, kbase + d, 4));
        const __m512 g1 = _mm512_castpd_ps(_mm512_i32gather_pd(o1, kbase + d, 4));
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                               26, 28, 30);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        _mm512_storeu_ps(kt + d * cw + t * W, _mm512_permutex2var_ps(g0, even, g1));
        _mm512_storeu_ps(kt + (d + 1) * cw + t * W, _mm512_permutex2var_ps(g0, odd, g1));
      }
#endif
    for (; d < Dk; ++d) vstore(kt + d * cw + t * W, vgather(kbase + d, koff + t * W));
  }
}

// s[g][t] = ((q_g . k_t) * scale) + 0 * (...) for QG queries and KV key vectors.
// qf: QG rows of Dk (accumulation type); kt: K^T, Dk rows of `cw` keys; st: QG rows of `cw`.
template <typename A, int QG, int KV>
static inline void score_tile(const A* qf, int64_t Dk, const A* kt, int64_t cw, A scale,
                              A* st) {
  constexpr int W = lanes<A>();
  Vec<A> acc[QG][KV];
  for (int g = 0; g < QG; ++g)
    for (int t = 0; t < KV; ++t) acc[g][t] = Vec<A>{};
  for (int64_t d = 0; d < Dk; ++d) {
    Vec<A> kv[KV];
    for (int t = 0; t < KV; ++t) kv[t] = vload(kt + d * cw + t * W);
    for (int g = 0; g < QG; ++g) {
      const Vec<A> qd = vset(qf[g * Dk + d]);
      for (int t = 0; t < KV; ++t) acc[g][t] += qd * kv[t];
    }
  }
  for (int g = 0; g < QG; ++g)
    for (int t = 0; t < KV; ++t) {
      const Vec<A> s = acc[g][t] * scale;
      vstore(st + g * cw + t * W, s + A(0) * s);
    }
}

// the last kv (< KV) key vectors of a chunk
template <typename A, int QG, int KV>
static inline void score_rest(const A* qf, int64_t Dk, const A* kt, int64_t cw, A scale, A* st,
                              int kv) {
  if constexpr (KV > 0) {
    if (kv == KV) return score_tile<A, QG, KV>(qf, Dk, kt, cw, scale, st);
    return score_rest<A, QG, KV - 1>(qf, Dk, kt, cw, scale, st, kv);
  }
}

// scores of QG queries against kv key vectors, in tiles of score_tile_keys<QG>()
template <typename A, int QG>
static inline void score_rows(const A* qf, int64_t Dk, const A* kt, int64_t cw, A scale, A* st,
                              int kv) {
  constexpr int W = lanes<A>();
  constexpr int KT = score_tile_keys<QG>();
  int t0 = 0;
  for (; t0 + KT <= kv; t0 += KT)
    score_tile<A, QG, KT>(qf, Dk, kt + t0 * W, cw, scale, st + t0 * W);
  score_rest<A, QG, KT - 1>(qf, Dk, kt + t0 * W, cw, scale, st + t0 * W, kv - t0);
}

// The narrow tail of P x V on AVX-512 (fp32 accumulation): a row's last Dv % W dims, when
// there are at most four of them (Dv = 36: dims 32 .. 35), take a 4-lane vector (an xmm
// register, read at Dv - 4) instead of a full one overlapping the vector before it. On Zen 4,
// whose 512-bit FMAs take both halves of the FMA pipes, a 4-lane FMA costs half a 16-lane one.
#if FS_VEC_BYTES == 64
static constexpr bool kNarrowTail = true;
typedef float Vec4f __attribute__((vector_size(16)));
template <typename S>
static inline Vec4f vload4_as(const S* p) {
  if constexpr (std::is_same<S, float>::value) {
    Vec4f v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same<S, c10::Half>::value) return (Vec4f)_mm_cvtph_ps(h);
    else return (Vec4f)_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  }
}
// the first n (1..4) lanes of v to p (a masked store), and of p (a masked load, the rest 0)
static inline void store4_n(float* p, Vec4f v, int n) {
  _mm_mask_storeu_ps(p, __mmask8((1u << n) - 1u), (__m128)v);
}
static inline Vec4f load4_n(const float* p, int n) {
  return (Vec4f)_mm_maskz_loadu_ps(__mmask8((1u << n) - 1u), p);
}
// lanes 0 .. 3 of v (its xmm register: no instruction)
static inline Vec4f low4(Vec<float> v) {
  return (Vec4f)_mm512_castps512_ps128((__m512)v);
}
typedef float Vec8f __attribute__((vector_size(32)));
static inline Vec8f vload8(const float* p) {
  Vec8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline void vstore8(float* p, Vec8f v) { std::memcpy(p, &v, sizeof(v)); }
// lane g of four 8-lane vectors, as one 4-lane vector
static inline Vec4f lane4(const Vec8f* a, int g) {
  return Vec4f{a[0][g], a[1][g], a[2][g], a[3][g]};
}
#else
static constexpr bool kNarrowTail = false;
typedef float Vec4f;  // never used as a vector below AVX-512
template <typename S> static inline Vec4f vload4_as(const S*) { return 0.0f; }
static inline Vec4f low4(Vec<float>) { return 0.0f; }
static inline void store4_n(float*, Vec4f, int) {}
static inline Vec4f load4_n(const float*, int) { return 0.0f; }
typedef float Vec8f;  // as Vec4f
static inline Vec8f vload8(const float* p) { return *p; }
static inline void vstore8(float* p, Vec8f v) { *p = v; }
static inline Vec4f lane4(const Vec8f*, int) { return 0.0f; }
#endif

// Rows to prefetch in software while P x V runs over a chunk's keys: the row of key index j
// (the same index kPrefetchKeys ahead) with key j, so the lines are asked for evenly over the
// chunk's longest stage rather than in bursts (see "Prefetch" in fwd_unit_t). Row j's lines
// are those starting inside it (the line holding row 0's start as well), each asked for once.
struct RowPrefetch {
  const char* base;  // row 0
  int64_t row_bytes;
  int64_t rows;      // rows that exist from base on (the array's end clips the last chunks)
};
__attribute__((always_inline)) static inline void prefetch_row(const RowPrefetch* pf,
                                                               int64_t j) {
  if (pf == nullptr || j >= pf->rows) return;
  const uintptr_t r = reinterpret_cast<uintptr_t>(pf->base) + uintptr_t(j * pf->row_bytes);
  uintptr_t x = j == 0 ? r : (r + 63) & ~uintptr_t(63);
  for (; x < r + uintptr_t(pf->row_bytes); x = (x | 63) + 1)
    __builtin_prefetch(reinterpret_cast<const void*>(x), 0, 2);
  __asm__ __volatile__("");  // as in prefetch_rows: or GCC may delete the prefetches
}

// ot[g] (DT value vectors at voff, then NT = 0 / 1 narrow tail vectors at voff[DT]) =
// ot[g] * alpha[g] + sum_j p[g][j] V_j for QG queries, V rows of element type S (A, or
// bf16 / fp16 read in place and converted in registers). With S1 the last query reads its p
// at ps[j] instead (256-bit query lanes: a block's 8 queries and the single after them).
// pf (or nullptr): rows to prefetch, one per key (RowPrefetch).
// A small tile (QG * DT < 8 accumulators) would wait on the FMA latency: it keeps KU partial
// sums over interleaved keys instead, added up in a fixed order at the end.
template <typename A, typename S, int QG, int DT, int NT, bool S1 = false, bool LT = false>
static inline void pv_tile(A* ot, int64_t ostride, const A* alpha, const A* pt, int64_t cw,
                           int64_t js, int nv, const S* const* vrows, const int64_t* voff,
                           const A* ps, const RowPrefetch* pf) {
  constexpr int W = lanes<A>();
  constexpr int KU = QG * (DT + NT) >= 8 ? 1 : QG * (DT + NT) >= 4 ? 2 : 4;
  static_assert(NT == 0 || (kNarrowTail && std::is_same<A, float>::value), "narrow tail");
  // LT (query lanes, cw = 1: the p of key j's queries at pt + j * js, contiguous): the narrow
  // tails of the first 8 queries with the queries in the lanes, 4 256-bit FMAs a key, one per
  // tail dim with V's element broadcast, instead of 8 128-bit FMAs. On Zen 4 a 128-bit FMA
  // takes a whole FMA-pipe slot, as a 256-bit one does: at Lq = 9, Dv = 36 (S1) 41 slots a key
  // instead of 45 (the floor: 40.5). The sums are the same FMAs in the same order, so results
  // are bit-identical.
  // Measured in one process (kernel op, fp32, H = 32, Lk = 729, Dv = 36, Zen 4, 16-20
  // interleaved rounds, time ratio to 128-bit tails): Lq = 9 (S1) B = 1 0.964-0.98 (1 and 2
  // threads), B = 16 0.967, B = 4 Lk = 3645 1.005 (memory-bound); 8-query groups (2 threads,
  // B = 1) Lq = 16 0.935, Lq = 17 0.954, Lq = 24 0.951, B = 16 Lq = 17 0.972. (All 36 dims
  // with the queries in the lanes, q8-value-lanes in docs/measurements/cpu-2026-12-07d-zen4,
  // had been 1.5x slower.)
  constexpr bool kLaneTail = LT && QG >= 8 && NT > 0 && std::is_same<S, float>::value;
  static_assert(!kLaneTail || KU == 1, "lane tail");
  Vec<A> acc[KU][QG][DT > 0 ? DT : 1];
  Vec4f accn[KU][QG][NT > 0 ? NT : 1];
  Vec8f acct[4];
  for (int d = 0; d < 4; ++d) acct[d] = Vec8f{};
  for (int u = 0; u < KU; ++u)
    for (int g = 0; g < QG; ++g) {
      for (int t = 0; t < DT; ++t) acc[u][g][t] = Vec<A>{};
      if constexpr (NT > 0) accn[u][g][0] = Vec4f{};
    }
  auto step = [&](int u, int jj) {
    prefetch_row(pf, jj);
    const S* vr = vrows[jj];
    Vec<A> vv[DT > 0 ? DT : 1];
    for (int t = 0; t < DT; ++t) vv[t] = vload_as<A>(vr + voff[t]);
    [[maybe_unused]] Vec4f vn{};
    if constexpr (NT > 0) vn = vload4_as(vr + voff[DT]);
    if constexpr (kLaneTail) {
      const Vec8f p8 = vload8(pt + jj * js);
      const float* vt = reinterpret_cast<const float*>(vr) + voff[DT];
      for (int d = 0; d < 4; ++d) acct[d] += (vt[d] - Vec8f{}) * p8;
    }
    for (int g = 0; g < QG; ++g) {
      const Vec<A> pj = vset(S1 && g == QG - 1 ? ps[jj] : pt[g * cw + jj * js]);
      for (int t = 0; t < DT; ++t) acc[u][g][t] += pj * vv[t];
      if constexpr (NT > 0)
        if (!kLaneTail || g >= 8)
          accn[u][g][0] += low4(pj) * vn;  // the same broadcast register
    }
  };
  int j = 0;
  for (; j + KU <= nv; j += KU)
    for (int u = 0; u < KU; ++u) step(u, j + u);
  for (; j < nv; ++j) step(0, j);
  for (int g = 0; g < QG; ++g) {
    A* og = ot + g * ostride;
    for (int t = 0; t < DT; ++t) {
      Vec<A> x = acc[0][g][t];
      for (int u = 1; u < KU; ++u) x += acc[u][g][t];
      vstore(og + t * W, vload(og + t * W) * alpha[g] + x);
    }
    if constexpr (NT > 0) {
      Vec4f x = accn[0][g][0], o;
      for (int u = 1; u < KU; ++u) x += accn[u][g][0];
      if constexpr (kLaneTail)
        if (g < 8) x = lane4(acct, g);
      std::memcpy(&o, og + DT * W, sizeof(o));
      o = o * alpha[g] + x;
      std::memcpy(og + DT * W, &o, sizeof(o));
    }
  }
}

// p of query g, key j at pt[g * cw + j * js] (key lanes: cw = chunk, js = 1; query lanes:
// cw = 1, js = W); with ps (qg == kPvQ, AVX-512 fp32), the last query's at ps[j]
template <typename A, typename S, int DT, int NT>
static inline void pv_rows(A* ot, int64_t ostride, const A* alpha, const A* pt, int64_t cw,
                           int64_t js, int nv, const S* const* vrows, const int64_t* voff,
                           int qg, const A* ps, const RowPrefetch* pf) {
#if FS_VEC_BYTES == 64
  if constexpr (std::is_same<A, float>::value)
    if (ps != nullptr)
      return pv_tile<A, S, kPvQ, DT, NT, true, true>(ot, ostride, alpha, pt, cw, js, nv, vrows,
                                                     voff, ps, pf);
  // query lanes (cw = 1), 8-query groups (Lq = 16, 24, ...): see pv_tile's LT
  if constexpr (NT > 0 && std::is_same<S, float>::value)
    if (cw == 1 && qg == 8)
      return pv_tile<A, S, 8, DT, NT, false, true>(ot, ostride, alpha, pt, cw, js, nv, vrows,
                                                   voff, nullptr, pf);
#endif
#define FS_PV_TILE(QG) \
  pv_tile<A, S, QG, DT, NT>(ot, ostride, alpha, pt, cw, js, nv, vrows, voff, nullptr, pf)
  switch (qg) {
    case 1: return FS_PV_TILE(1);
    case 2: return FS_PV_TILE(2);
    case 3: return FS_PV_TILE(3);
    case 4: return FS_PV_TILE(4);
    case 5: return FS_PV_TILE(5);
    case 6: return FS_PV_TILE(6);
    case 7: return FS_PV_TILE(7);
    case 8: return FS_PV_TILE(8);
    default: return FS_PV_TILE(kPvQ);
  }
#undef FS_PV_TILE
}

// P x V of qg queries over all nd value vectors: three at a time for groups of up to kPv3Q
// queries, then two, then one; with `narrow`, the last of the nd is the narrow tail, taken
// with the tile before it (or alone). ps: see pv_rows; pf (or nullptr): rows to prefetch
// during the first tile's pass over the keys.
template <typename A, typename S>
static inline void pv_block(A* otq, int64_t ostride, const A* alq, const A* ptq, int64_t cw,
                            int64_t js, int nv, const S* const* vrows, const int64_t* voff,
                            int64_t nd, bool narrow, int qg, const A* ps,
                            const RowPrefetch* pf) {
  constexpr int W = lanes<A>();
  const int64_t nf = nd - (narrow ? 1 : 0);  // full vectors
  int64_t t0 = 0;
  auto rows = [&](auto dt_const, auto nt_const) {
    constexpr int DT = decltype(dt_const)::value, NT = decltype(nt_const)::value;
    pv_rows<A, S, DT, NT>(otq + t0 * W, ostride, alq, ptq, cw, js, nv, vrows, voff + t0, qg,
                          ps, t0 == 0 ? pf : nullptr);
    t0 += DT + NT;
  };
  using I0 = std::integral_constant<int, 0>;
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  if constexpr (kNarrowTail && std::is_same<A, float>::value) {
    if (narrow) {
      if (qg <= kPv3Q)
        while (t0 + 3 <= nf) rows(I3{}, I0{});
      while (t0 + 2 < nf) rows(I2{}, I0{});
      if (nf - t0 == 2) rows(I2{}, I1{});
      else if (nf - t0 == 1) rows(I1{}, I1{});
      else rows(I0{}, I1{});
      return;
    }
  }
  if (qg <= kPv3Q)
    while (t0 + 3 <= nf) rows(I3{}, I0{});
  while (t0 + 2 <= nf) rows(I2{}, I0{});
  while (t0 < nf) rows(I1{}, I0{});
}

// The G dot vectors of score_qlanes as scores: s = dot * scale, then s + 0 * s (a +-inf score
// becomes NaN), stored at out + g * W; returns the max of mx and the scores (a plain max, one
// instruction: a NaN score may be dropped from it, and the caller finds it in the sum of p).
template <typename A, int G>
static inline Vec<A> store_scores(const Vec<A>* acc, A scale, A* out, Vec<A> mx) {
  constexpr int W = lanes<A>();
  for (int g = 0; g < G; ++g) {
    const Vec<A> sg = acc[g] * scale;
    const Vec<A> s = sg + A(0) * sg;
    vstore(out + g * W, s);
    mx = vmax<A>(mx, s);
  }
  return mx;
}

// Query lanes (used when a query block fills more than half the lanes): scores of G keys for
// the W queries of one block, out[g] = (sum_d K[g][d] qt[d]) * scale (+ 0 * s), K rows read
// in place (one broadcast element per FMA), qt = the block's q transposed (Dk x W). Returns
// the max of mx and the G score vectors (a plain max, one instruction: a NaN score may be
// dropped from it, and the caller finds it in the sum of p instead). G = 8 keeps 8 FMA chains in flight
// (two FMA ports x 4 cycles of latency); 4 left the score loop latency-bound at half rate.
template <typename A, int G>
static inline Vec<A> score_qlanes(const A* qt, const A* kbase, const int32_t* koff, int64_t Dk,
                                  A scale, A* out, Vec<A> mx) {
  constexpr int W = lanes<A>();
  Vec<A> acc[G];
  const A* kr[G];
  for (int g = 0; g < G; ++g) {
    acc[g] = Vec<A>{};
    kr[g] = kbase + koff[g];
  }
  for (int64_t d = 0; d < Dk; ++d) {
    const Vec<A> qv = vload(qt + d * W);
    for (int g = 0; g < G; ++g) acc[g] += vset(kr[g][d]) * qv;
  }
  return store_scores<A, G>(acc, scale, out, mx);
}

#if FS_BF16_DOT
// score_qlanes for bf16 inputs with AVX512-BF16: K rows read in place as bf16 pairs (dims
// 2p, 2p + 1 broadcast as one dword), qt2 the block's q as bf16 pairs (Dk / 2 rounded up rows
// of W dwords; an odd Dk's last pair holds q's last dim and 0), one vdpbf16ps per pair: half
// the FMAs of score_qlanes and no conversion of K. Products of two bf16 are exact in fp32 and
// accumulate in fp32; vdpbf16ps treats subnormal inputs as 0 and flushes subnormal results,
// so the caller takes this path only for query blocks without subnormals and with
// |q| <= 2^64 (a subnormal k then changes a score by < 2^-62: nothing in fp32 at any score).
template <int G>
static inline Vec<float> score_qlanes_bf16(const uint32_t* qt2, const c10::BFloat16* kbase,
                                           const int32_t* koff, int64_t Dk, float scale,
                                           float* out, Vec<float> mx) {
  constexpr int W = lanes<float>();
  __m512 acc[G];
  const uint16_t* kr[G];
  for (int g = 0; g < G; ++g) {
    acc[g] = _mm512_setzero_ps();
    kr[g] = reinterpret_cast<const uint16_t*>(kbase + koff[g]);
  }
  const int64_t np = Dk / 2;
  for (int64_t p = 0; p < np; ++p) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qt2 + p * W);
    for (int g = 0; g < G; ++g) {
      uint32_t kk;
      std::memcpy(&kk, kr[g] + 2 * p, 4);
      acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_set1_epi32(int(kk)), qv);
    }
  }
  if (Dk % 2) {  // the last dim alone: its pair's upper half is 0 in both operands
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qt2 + np * W);
    for (int g = 0; g < G; ++g)
      acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_set1_epi32(int(kr[g][Dk - 1])), qv);
  }
  Vec<float> dots[G];
  for (int g = 0; g < G; ++g) dots[g] = (Vec<float>)acc[g];
  return store_scores<float, G>(dots, scale, out, mx);
}

// Whether a query block may take score_qlanes_bf16: no subnormal, every |q| <= 2^64 (NaN and
// inf take the converting path).
static inline bool bf16_dot_ok(const c10::BFloat16* q, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    const uint16_t a = q[e].x & 0x7FFF;
    if ((a != 0 && a < 0x0080) || a > 0x5F80) return false;  // 0x5F80: 2^64
  }
  return true;
}
#endif

#if FS_VEC_BYTES == 64
// 256-bit query lanes (AVX-512 variants, fp32 accumulation): the query-lane forward of a unit
// of 8k + 1 queries (Lq = 9) runs k blocks of 8 queries in 256-bit vectors and the last query
// alone (the "single": scores by dot_scores8, softmax with lanes over keys). On AMD Zen 4,
// which runs a 512-bit instruction as two 256-bit halves, the 512-bit query lanes' score FMAs
// and exp2 cost 16 lanes' worth for 9 queries; these cost 8 lanes' worth plus the single's
// dots. Measured in one process (kernel op, fp32, H = 32, Lk = 729, 2 threads, 16-20
// interleaved rounds, time ratio to the 512-bit query lanes): B = 1 0.918-0.935, 1 thread
// 0.916-0.943; with the V prefetch spread over P x V (see fwd_unit_t) B = 16 0.90-1.01,
// B = 4 Lk = 3645 0.88-0.92 (prefetched as before, B >= 4 was 1.03-1.12: the shorter score
// loop bunched its prefetches).
static inline Vec8f vmax8(Vec8f a, Vec8f b) { return a > b ? a : b; }
static inline Vec8f vmax8_nan(Vec8f a, Vec8f b) { return ((a > b) | (a != a)) ? a : b; }
// vexp2 on 8 lanes: the same function, by the AVX-512VL forms of its instructions
__attribute__((always_inline)) static inline Vec8f vexp2_8(Vec8f x) {
  const __m256 xv = _mm256_min_ps(_mm256_set1_ps(127.0f), (__m256)x);  // NaN stays NaN
  const __m256 n = _mm256_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec8f p = exp2_poly((Vec8f)xv - (Vec8f)n);
  const __mmask8 keep = _mm256_cmp_ps_mask((__m256)x, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ);
  return (Vec8f)_mm256_maskz_scalef_ps(keep, (__m256)p, n);
}

// score_qlanes on 8 query lanes: out[g * 8 + i] = (q_i . k_g) * scale (+ 0 * s) for the G
// keys at kbase + koff[g]; qt8: the block's q transposed (Dk rows of 8). Returns the plain max
// of mx and the scores (a NaN score it drops shows in the row's sum, as in score_qlanes).
template <int G>
__attribute__((always_inline)) static inline Vec8f score_q8(const float* qt8, const float* kbase,
                                                            const int32_t* koff, int64_t Dk,
                                                            float scale, float* out, Vec8f mx) {
  Vec8f acc[G];
  const float* kr[G];
  for (int g = 0; g < G; ++g) {
    acc[g] = Vec8f{};
    kr[g] = kbase + koff[g];
  }
  for (int64_t d = 0; d < Dk; ++d) {
    const Vec8f qv = vload8(qt8 + d * 8);
    for (int g = 0; g < G; ++g) acc[g] += (kr[g][d] - Vec8f{}) * qv;
  }
  for (int g = 0; g < G; ++g) {
    const Vec8f sg = acc[g] * scale;
    const Vec8f sv = sg + 0.0f * sg;
    vstore8(out + g * 8, sv);
    mx = vmax8(mx, sv);
  }
  return mx;
}

// Scores of one query (qs: Dk rounded up to 8 floats, zero padded) against 8 keys at
// kbase + koff[0 .. 8), K rows read in place: head dims in 8 lanes (a last block of 1-7 dims by
// a masked load, never past the row), the 8 keys' sums by horizontal adds. out[g] =
// (q . k_g) * scale + 0 * s. The key-lane forward of a single query (Lq = 1) uses it instead
// of transposing K: no register transposition, no gathers for the tail dims.
__attribute__((always_inline)) static inline void dot_scores8(const float* qs,
                                                              const float* kbase,
                                                              const int32_t* koff, int64_t Dk,
                                                              float scale, float* out) {
  __m256 acc[8];
  const float* kr[8];
  for (int g = 0; g < 8; ++g) {
    acc[g] = _mm256_setzero_ps();
    kr[g] = kbase + koff[g];
  }
  const int64_t nf = Dk / 8 * 8;
  for (int64_t d = 0; d < nf; d += 8) {
    const __m256 qv = _mm256_loadu_ps(qs + d);
    for (int g = 0; g < 8; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(kr[g] + d), qv, acc[g]);
  }
  if (nf < Dk) {
    const __mmask8 m = __mmask8((1u << (Dk - nf)) - 1u);
    const __m256 qv = _mm256_loadu_ps(qs + nf);
    for (int g = 0; g < 8; ++g)
      acc[g] = _mm256_fmadd_ps(_mm256_maskz_loadu_ps(m, kr[g] + nf), qv, acc[g]);
  }
  // per 128-bit half, [k0, k1, k2, k3] sums of that half's 4 dims; then the halves added
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 x = _mm256_hadd_ps(h01, h23), y = _mm256_hadd_ps(h45, h67);
  const __m256 lo = _mm256_permute2f128_ps(x, y, 0x20), hi = _mm256_permute2f128_ps(x, y, 0x31);
  const __m256 sg = _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale));
  _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_setzero_ps(), sg, sg));
}
#endif

// Query groups of at most `most` rows, balanced (9 rows, most 8: 5 + 4, not 8 + 1).
static inline int64_t group_len(int64_t R, int64_t most) {
  const int64_t ng = (R + most - 1) / most;
  return (R + ng - 1) / ng;
}

// Software prefetch of the rows [r0, r0 + n) of a row-major (rows x cols) array into L1,
// clipped to its `rows`: the forward asks for the next chunk's K and V rows a few keys at a
// time while it works on the current chunk (past the range's end: the next head's, which the
// same thread usually takes next), so the loads of the next chunk find them in cache.
template <typename T>
static inline void prefetch_rows(const T* base, int64_t r0, int64_t n, int64_t rows,
                                 int64_t cols) {
  if (r0 >= rows) return;
  const char* p = reinterpret_cast<const char*>(base + r0 * cols);
  const int64_t bytes = std::min(n, rows - r0) * cols * int64_t(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
  // GCC counts __builtin_prefetch as no side effect: without this barrier a prefetch_rows
  // it does not inline early is found "const" (ipa-pure-const) and every call to it is
  // deleted. That silently removed the key-lane forward's prefetch (Lq <= W / 2, called
  // through transpose_keys' step) until 2026-12-06.
  __asm__ __volatile__("");
}

// One forward unit: (b, h), a superblock of queries and a range of keys, online softmax over
// key chunks. Writes out / lse (nsplit == 1) or the split's normalised partials.
template <typename T, typename A>
static void fwd_unit_t(const FwdParams& P, int64_t u) {
  constexpr int W = lanes<A>();
  constexpr int64_t CW = kChunkKeys;
  typedef Vec<A> V;
  const Shape& s = P.s;
  const int64_t sp = u % s.nsplit;
  const int64_t qsb = (u / s.nsplit) % s.nqsb;
  const int64_t bh = u / (s.nsplit * s.nqsb);
  const int64_t b = bh / s.H;
  const int64_t Lq = s.Lq, Lk = s.Lk, Dk = s.Dk, Dv = s.Dv;
  const int64_t i0 = qsb * s.qsb_len, R = std::min(s.qsb_len, Lq - i0);
  const int64_t j0 = sp * s.split_len, j1 = std::min(Lk, j0 + s.split_len);
  const T* q = static_cast<const T*>(P.q) + (bh * Lq + i0) * Dk;
  const T* k = static_cast<const T*>(P.k) + bh * Lk * Dk;
  const T* v = static_cast<const T*>(P.v) + bh * Lk * Dv;
  const bool* mrow = P.mask ? P.mask + b * Lk : nullptr;
  const T* k_all = static_cast<const T*>(P.k);  // every head's rows, for the prefetch
  const T* v_all = static_cast<const T*>(P.v);
  const int64_t rows_all = s.B * s.H * Lk;
  // Value vectors of a row: at offsets t * W, the last one ending at Dv when Dv >= W (it
  // overlaps the one before), so rows at least a vector wide need no padding: fp32 V is read
  // in place. Narrower rows are copied into a zero-padded buffer.
  constexpr bool kSame = std::is_same<T, A>::value;
  const bool v_overlap = Dv >= W;
  // 16-bit V rows at least a vector wide are read in place by P x V and converted in
  // registers (vload_as) on AVX2 / AVX-512: no conversion pass through a buffer
  const bool vdirect = !kSame && v_overlap && FS_VEC_BYTES >= 32;
  const int64_t nd = (Dv + W - 1) / W;  // value vectors per row
  const int64_t Dvp = nd * W;
  // the narrow tail (kNarrowTail): the last value vector has 4 lanes, read at Dv - 4
  const bool narrow = kNarrowTail && std::is_same<A, float>::value && v_overlap &&
                      Dv % W != 0 && Dv % W <= 4;
  int64_t voff[256 / 2 + 1];
  for (int64_t t = 0; t < nd; ++t) voff[t] = v_overlap ? std::min(t * W, Dv - W) : t * W;
  if (narrow) voff[nd - 1] = Dv - 4;

  // Scores and softmax with lanes over queries instead when query blocks of W are full
  // enough (Lq = 9 on AVX-512): K rows are then read in place, with no transposition, and the
  // softmax needs no horizontal reductions. P x V keeps its value lanes either way. "Enough"
  // was measured per ISA: more than half on AVX-512; at least 7 / 8 on AVX2, whose 4 x 8
  // transposition is cheap next to its query-lane scores (AMD Zen 3, one thread, fused
  // forward ms, query lanes -> key lanes, min of 4-5 interleaved rounds: B = 1 Lk = 729
  // Lq = 9 0.97 -> 0.68, Lq = 12 1.02 -> 0.88, Lq = 6 0.56 -> 0.49, B = 16 Lq = 9 16.5 ->
  // 12.5; Lq = 7, 8, 15, 16 were 1.02-1.14x slower in key lanes).
  const int64_t nqb = (R + W - 1) / W, RW = nqb * W;
  const bool qlanes = FS_VEC_BYTES == 32 ? 8 * R >= 7 * RW : 2 * R > RW;
  // bf16 with AVX512-BF16: query-lane scores by vdpbf16ps straight from the bf16 K rows
  // (score_qlanes_bf16; the unit's queries must allow it: bf16_dot_ok)
  [[maybe_unused]] constexpr bool kBf16 = std::is_same<T, c10::BFloat16>::value;
  bool bf16dot = false;
#if FS_BF16_DOT
  if constexpr (kBf16) bf16dot = qlanes && bf16_dot_ok(q, R * Dk);
#endif
  const int64_t npair = (Dk + 1) / 2;
  // one query in key lanes (AVX-512, fp32 accumulation): scores by dot_scores8, K rows read in
  // place. Measured on Zen 4 against the transposition (H = 32, Lk = 729, kernel op, five
  // interleaved rounds, ms): B = 1 Lq = 1 0.147-0.163 -> 0.131-0.134 (1 thread), 0.079-0.082
  // -> 0.071-0.073 (2 threads); Lq = 17 (its single query) 0.342-0.355 -> 0.330-0.340; B = 16
  // within noise (memory-bound). At Lq = 2 (each query's dots apart) no faster than the
  // transposition both queries share.
  bool dots = false;
#if FS_VEC_BYTES == 64
  if constexpr (std::is_same<A, float>::value) dots = !qlanes && R == 1;
#endif
  // 8k + 1 query-lane queries in 256-bit blocks of 8 and a single (see score_q8)
  bool q8 = false;
#if FS_VEC_BYTES == 64
  if constexpr (std::is_same<A, float>::value) q8 = qlanes && !bf16dot && R % 8 == 1;
#endif
  const int64_t nb8 = q8 ? R / 8 : 0, Dk8 = (Dk + 7) / 8 * 8;

  const int64_t ostride = Dvp;
  const int64_t n_qf = (R * Dk + W - 1) / W * W, n_kt = qlanes || dots ? 0 : Dk * CW;
  // qt: the query blocks' q transposed (query lanes: Dk rows of W; q8: of 8, then the single's
  // q zero padded to Dk8), or the query zero padded to Dk8 (dots)
  const int64_t n_qt = q8 ? nb8 * Dk * 8 + Dk8 : qlanes ? nqb * Dk * W : dots ? R * Dk8 : 0;
  const int64_t n_st = RW * CW, n_ot = R * ostride;
  const int64_t n_l = R * W;  // >= RW
  const int64_t n_kb = (kSame || bf16dot) ? 0 : CW * Dk;
  const int64_t n_vb = ((kSame && v_overlap) || vdirect) ? 0 : CW * Dvp;
  const int64_t n_qt2 = bf16dot ? nqb * npair * W : 0;  // 32-bit words (A is float then)
  A* qf = scratch<A>(n_qf + n_kt + n_qt + n_st + n_ot + n_l + 2 * RW + n_kb + n_vb + Dvp +
                     n_qt2 + 8 * W);
  A* kt = qf + n_qf;
  A* qt = kt + n_kt;
  A* st = qt + n_qt;
  A* ot = st + n_st;
  A* lv = ot + n_ot;
  A* mb = lv + n_l;
  A* alpha = mb + RW;
  A* kb = alpha + RW;
  A* vb = kb + n_kb;
  A* orow = vb + n_vb;  // one output row, gathered from the value vectors
  uint32_t* qt2 = reinterpret_cast<uint32_t*>(orow + Dvp);  // bf16 pairs (bf16dot)
  int32_t idx[CW];
  int32_t koff[CW];
  const A* vrows[CW];     // V rows in the accumulation type (in place or converted)
  const T* vrows_t[CW];   // V rows read in place, converted in registers (vdirect)

  load_row(qf, q, R * Dk);
  if (dots) {
    std::fill(qt, qt + n_qt, A(0));
    for (int64_t i = 0; i < R; ++i) std::copy(qf + i * Dk, qf + (i + 1) * Dk, qt + i * Dk8);
  }
  if (q8) {
    std::fill(qt, qt + n_qt, A(0));  // the single's padding dims: 0
    for (int64_t i = 0; i < 8 * nb8; ++i)
      for (int64_t d = 0; d < Dk; ++d) qt[((i / 8) * Dk + d) * 8 + i % 8] = qf[i * Dk + d];
    std::copy(qf + 8 * nb8 * Dk, qf + R * Dk, qt + nb8 * Dk * 8);
  } else if (qlanes) {
    std::fill(qt, qt + n_qt, A(0));  // padded lanes: q = 0, finite scores, never output
    for (int64_t i = 0; i < R; ++i)
      for (int64_t d = 0; d < Dk; ++d) qt[((i / W) * Dk + d) * W + i % W] = qf[i * Dk + d];
  }
  if (bf16dot) {
    std::fill(qt2, qt2 + n_qt2, 0u);  // padded lanes and an odd Dk's last upper half: 0
    const uint16_t* qb16 = reinterpret_cast<const uint16_t*>(q);
    for (int64_t i = 0; i < R; ++i)
      for (int64_t d = 0; d < Dk; ++d)
        qt2[((i / W) * npair + d / 2) * W + i % W] |= uint32_t(qb16[i * Dk + d]) << (16 * (d % 2));
  }
  std::fill(ot, ot + n_ot, A(0));
  std::fill(lv, lv + n_l, A(0));
  std::fill(mb, mb + RW, -std::numeric_limits<A>::infinity());
  std::fill(alpha, alpha + RW, A(0));  // lanes past R: never used, but never garbage either
  const A scale = A(P.scale);
  const A log2e = A(1.4426950408889634);
  const A ninf = -std::numeric_limits<A>::infinity();

  // How far ahead the K rows are prefetched (P.prefetch). 16-bit K rows converted into kb (fp16;
  // bf16 without vdpbf16ps) are read a whole chunk at a time, at the chunk's start: their
  // prefetch covers at least the next chunk (on AVX-512, 256 keys instead of 192: the last 64
  // rows had been demand misses). Measured in one process (kernel op, fp16, H = 32, 2 threads,
  // Zen 4, 12 interleaved rounds, time ratio to 192): B = 16 Lk = 729 Lq = 9 0.951 (320, 384,
  // 512 keys: 0.953-0.956), Lq = 1 0.892, Lq = 2 0.962, Lq = 17 0.979; B = 4 Lk = 3645 Lq = 9
  // 0.945. K read in place (fp32, bf16 by vdpbf16ps) keeps kPrefetchKeys.
  const int64_t kpf_k =
      (!kSame && !bf16dot) ? std::max<int64_t>(CW, kPrefetchKeys) : kPrefetchKeys;
  for (int64_t c0 = j0; c0 < j1; c0 += CW) {
    const int64_t kc = std::min(CW, j1 - c0);
    const int nv = gather_keys(mrow, c0, kc, idx);
    if (nv == 0) continue;
    const int nkv = (nv + W - 1) / W;
    const bool dense = nv == kc;  // no masked key in the chunk: convert it as one block
    // K^T of the attended keys (lanes past nv repeat the first key; their scores are
    // replaced by -inf below, so every lane reads an attended row). Masked rows are never
    // read: a chunk with masked keys converts only its attended rows.
    const A* ksrc = nullptr;
    if constexpr (kSame) {
      ksrc = reinterpret_cast<const A*>(k + c0 * Dk);
      for (int c = 0; c < nkv * W; ++c) koff[c] = idx[c < nv ? c : 0] * int32_t(Dk);
    } else if (bf16dot) {  // the bf16 rows in place: koff into k + c0 * Dk
      for (int c = 0; c < nkv * W; ++c) koff[c] = idx[c < nv ? c : 0] * int32_t(Dk);
    } else {
      if (dense) {
        const T* kr = k + c0 * Dk;
        load_row(kb, kr, kc * Dk);
      } else {
        for (int c = 0; c < nv; ++c) {
          const T* kr = k + (c0 + idx[c]) * Dk;
          A* dst = kb + c * Dk;
          load_row(dst, kr, Dk);
        }
      }
      ksrc = kb;
      // dense: idx[c] == c; otherwise the attended rows were packed: row c either way
      for (int c = 0; c < nkv * W; ++c) koff[c] = (c < nv ? c : 0) * int32_t(Dk);
    }
    if (!qlanes && !dots) {
      // the K rows kpf_k ahead, a key vector's share per step of the transposition
      // (the V rows: during P x V, see "Prefetch" above). Until 2026-12-06 GCC deleted these
      // calls (see prefetch_rows); issued, they took B = 16 Lq = 1 from ~5.4 to ~3.1 ms on
      // AMD Zen 3 (AVX2, 2 threads, 4 interleaved rounds; B = 1 unchanged).
      const int64_t pf = (CW + nkv - 1) / nkv;
      transpose_keys(ksrc, koff, Dk, nkv, kt, CW, [&](int t) {
        if (!P.prefetch) return;
        prefetch_rows(k_all, bh * Lk + c0 + kpf_k + t * pf, pf, rows_all, Dk);
      });
    }
    if (kSame && v_overlap) {
      for (int c = 0; c < nv; ++c) vrows[c] = reinterpret_cast<const A*>(v + (c0 + idx[c]) * Dv);
    } else if (vdirect) {
      for (int c = 0; c < nv; ++c) vrows_t[c] = v + (c0 + idx[c]) * Dv;
    } else if (v_overlap && dense) {
      const T* vr = v + c0 * Dv;
      load_row(vb, vr, kc * Dv);
      for (int c = 0; c < nv; ++c) vrows[c] = vb + c * Dv;
    } else {
      const int64_t vs = v_overlap ? Dv : Dvp;
      for (int c = 0; c < nv; ++c) {
        const T* vr = v + (c0 + idx[c]) * Dv;
        A* dst = vb + c * vs;
        load_row(dst, vr, Dv);
        for (int64_t d = Dv; d < vs; ++d) dst[d] = A(0);
        vrows[c] = dst;
      }
    }
    // Prefetch (P.prefetch: K and V too large to stay in cache): the K rows kpf_k ahead
    // during the scores, a key group's share at a time, and the V rows kPrefetchKeys ahead
    // during P x V, one row per key (RowPrefetch), so that each stage asks for what it can
    // spread over its own work. Both during the scores, the V share had bunched up there (at
    // 256-bit query lanes, whose score loop is half as long, B = 16 ran 3-12% slower).
    // Measured in one process (kernel op, fp32, H = 32, 2 threads, 16 interleaved rounds,
    // time ratio to both during the scores): B = 16 Lk = 729 Lq = 1 0.83-0.84, Lq = 2 0.81,
    // Lq = 9 0.92-1.01, B = 4 Lk = 3645 Lq = 9 0.90-0.96; the K rows moved into P x V as well
    // gained less (Lq = 1 0.89-0.98, Lq = 9 0.97-1.00).
    RowPrefetch vpf{};
    const RowPrefetch* vpf_p = nullptr;
    if (P.prefetch) {
      const int64_t r0 = std::min(bh * Lk + c0 + kPrefetchKeys, rows_all);
      vpf = RowPrefetch{reinterpret_cast<const char*>(v_all + r0 * Dv),
                        int64_t(Dv * sizeof(T)), rows_all - r0};
      vpf_p = &vpf;
    }

#if FS_VEC_BYTES == 64
    if constexpr (std::is_same<A, float>::value) {
      if (q8) {
        // as the query lanes below, in blocks of 8 lanes: scores (then p) of block b8 at
        // st + b8 * 8 * CW, [key][8 queries]; the single's at ss, [key]
        A* ss = st + nb8 * 8 * CW;
        for (int64_t b8 = 0; b8 < nb8; ++b8) {
          A* stq = st + b8 * 8 * CW;
          const A* qtb = qt + b8 * Dk * 8;
          Vec8f mx = Vec8f{} + ninf;  // scores are never -inf (s + 0 * s)
          int j = 0;
          for (; j + 8 <= nv; j += 8) {
            if (b8 == 0 && P.prefetch)  // K rows kpf_k ahead, a key group's share
              prefetch_rows(k_all, bh * Lk + c0 + kpf_k + j * kc / nv, 8 * kc / nv + 1,
                            rows_all, Dk);
            mx = score_q8<8>(qtb, ksrc, koff + j, Dk, scale, stq + j * 8, mx);
          }
          for (; j + 4 <= nv; j += 4)
            mx = score_q8<4>(qtb, ksrc, koff + j, Dk, scale, stq + j * 8, mx);
          for (; j < nv; ++j) mx = score_q8<1>(qtb, ksrc, koff + j, Dk, scale, stq + j * 8, mx);
          const Vec8f mold = vload8(mb + b8 * 8);
          const Vec8f mnew = vmax8_nan(mold, mx);
          const Vec8f al = vexp2_8((mold - mnew) * log2e);  // 0 while mold is -inf
          vstore8(alpha + b8 * 8, al);
          Vec8f ls0 = Vec8f{}, ls1 = Vec8f{};
          for (j = 0; j + 2 <= nv; j += 2) {
            const Vec8f p0 = vexp2_8((vload8(stq + j * 8) - mnew) * log2e);
            const Vec8f p1 = vexp2_8((vload8(stq + (j + 1) * 8) - mnew) * log2e);
            vstore8(stq + j * 8, p0);
            vstore8(stq + (j + 1) * 8, p1);
            ls0 += p0;
            ls1 += p1;
          }
          if (j < nv) {
            const Vec8f p0 = vexp2_8((vload8(stq + j * 8) - mnew) * log2e);
            vstore8(stq + j * 8, p0);
            ls0 += p0;
          }
          const Vec8f ls = ls0 + ls1;
          vstore8(mb + b8 * 8, ls != ls ? ls : mnew);  // as the query lanes below
          vstore8(lv + b8 * 8, vload8(lv + b8 * 8) * al + ls);
        }
        {  // the single, as one query of the key lanes' softmax below
          const int64_t i = 8 * nb8;
          for (int j = 0; j < nv; j += 8)  // koff past nv: an attended row (scores unused)
            dot_scores8(qt + nb8 * Dk * 8, ksrc, koff + j, Dk, scale, ss + j);
          for (int c = nv; c < nkv * W; ++c) ss[c] = ninf;
          V mx = vload(ss);
          for (int t = 1; t < nkv; ++t) mx = vmax<A>(mx, vload(ss + t * W));
          const A mold = mb[i], mnew = max_nan(mold, hmax<A>(mx));
          const V mv = vset(mnew);
          V lsum = V{};
          for (int t = 0; t < nkv; ++t) {
            const V p = vexp2((vload(ss + t * W) - mv) * log2e);
            vstore(ss + t * W, p);
            lsum += p;
          }
          const A al = vexp2(vset((mold - mnew) * log2e))[0];  // 0 while mold is -inf
          alpha[i] = al;
          mb[i] = mnew;
          lv[i] = lv[i] * al + hsum<A>(lsum);
        }
        // P x V: each block's 8 queries (p at stq[8 * j + i]), the last with the single
        for (int64_t b8 = 0; b8 < nb8; ++b8) {
          const bool last = b8 == nb8 - 1;
          A* otq = ot + b8 * 8 * ostride;
          const A* ptq = st + b8 * 8 * CW;
          const A* ps = last ? ss : nullptr;
          const int qg = last ? 9 : 8;
          const RowPrefetch* pf = b8 == 0 ? vpf_p : nullptr;
          if (vdirect)
            pv_block<A, T>(otq, ostride, alpha + b8 * 8, ptq, 1, 8, nv, vrows_t, voff, nd,
                           narrow, qg, ps, pf);
          else
            pv_block<A, A>(otq, ostride, alpha + b8 * 8, ptq, 1, 8, nv, vrows, voff, nd,
                           narrow, qg, ps, pf);
        }
        continue;
      }
    }
#endif

    if (qlanes) {
      for (int64_t qb = 0; qb < nqb; ++qb) {
        A* stq = st + qb * CW * W;  // [key][query lane]
        const A* qtb = qt + qb * Dk * W;
        // scores are never -inf (s + 0 * s), so -inf seeds the max
        V mx = vset(ninf);
        // G keys' scores from koff + j
        auto score = [&](auto g_const, int j, V m) -> V {
          constexpr int G = decltype(g_const)::value;
#if FS_BF16_DOT
          if constexpr (kBf16)
            if (bf16dot)
              return score_qlanes_bf16<G>(qt2 + qb * npair * W, k + c0 * Dk, koff + j, Dk,
                                          scale, stq + j * W, m);
#endif
          return score_qlanes<A, G>(qtb, ksrc, koff + j, Dk, scale, stq + j * W, m);
        };
        int j = 0;
        for (; j + 8 <= nv; j += 8) {
          if (qb == 0 && P.prefetch)  // K rows kpf_k ahead, a key group's share
            prefetch_rows(k_all, bh * Lk + c0 + kpf_k + j * kc / nv, 8 * kc / nv + 1,
                          rows_all, Dk);
          mx = score(std::integral_constant<int, 8>{}, j, mx);
        }
        for (; j + 4 <= nv; j += 4) mx = score(std::integral_constant<int, 4>{}, j, mx);
        for (; j < nv; ++j) mx = score(std::integral_constant<int, 1>{}, j, mx);
        const V mold = vload(mb + qb * W);
        const V mnew = vmax_nan<A>(mold, mx);
        const V al = vexp2((mold - mnew) * log2e);  // 0 while mold is -inf
        vstore(alpha + qb * W, al);
        V ls0 = V{}, ls1 = V{};  // two chains: the sum does not wait on the add latency
        for (j = 0; j + 2 <= nv; j += 2) {
          const V p0 = vexp2((vload(stq + j * W) - mnew) * log2e);
          const V p1 = vexp2((vload(stq + (j + 1) * W) - mnew) * log2e);
          vstore(stq + j * W, p0);
          vstore(stq + (j + 1) * W, p1);
          ls0 += p0;
          ls1 += p1;
        }
        if (j < nv) {
          const V p0 = vexp2((vload(stq + j * W) - mnew) * log2e);
          vstore(stq + j * W, p0);
          ls0 += p0;
        }
        const V ls = ls0 + ls1;
        // A NaN score the plain max dropped made its p, and so this sum, NaN: the row's max
        // becomes NaN too, so that it stays NaN (vmax_nan above, in later chunks) and the
        // row is never taken for an all-masked one at the end.
        vstore(mb + qb * W, ls != ls ? ls : mnew);
        vstore(lv + qb * W, vload(lv + qb * W) * al + ls);
        // P x V for the block's rows: p of query g, key j at stq[j * W + g]
        const int64_t r0 = qb * W, nr = std::min<int64_t>(W, R - r0);
        const int64_t pg = group_len(nr, kPvQ);
        for (int64_t qa = 0; qa < nr; qa += pg) {
          const int qg = int(std::min<int64_t>(pg, nr - qa));
          A* otq = ot + (r0 + qa) * ostride;
          const A* ptq = stq + qa;
          const A* alq = alpha + r0 + qa;
          const RowPrefetch* pf = qb == 0 && qa == 0 ? vpf_p : nullptr;
          if (vdirect)
            pv_block<A, T>(otq, ostride, alq, ptq, 1, W, nv, vrows_t, voff, nd, narrow, qg,
                           nullptr, pf);
          else
            pv_block<A, A>(otq, ostride, alq, ptq, 1, W, nv, vrows, voff, nd, narrow, qg,
                           nullptr, pf);
        }
      }
      continue;
    }

    // scores
    if (dots) {
#if FS_VEC_BYTES == 64
      if constexpr (std::is_same<A, float>::value)
        for (int j = 0; j < nv; j += 8) {  // koff past nv: an attended row (scores unused)
          // the K rows kpf_k ahead, a key group's share at a time
          if (P.prefetch)
            prefetch_rows(k_all, bh * Lk + c0 + kpf_k + j * kc / nv, 8 * kc / nv + 1,
                          rows_all, Dk);
          for (int64_t i = 0; i < R; ++i)
            dot_scores8(qt + i * Dk8, ksrc, koff + j, Dk, scale, st + i * CW + j);
        }
#endif
    } else {
      const int64_t sg = group_len(R, kScoreQ);
      for (int64_t g0 = 0; g0 < R; g0 += sg) {
        const A* qg = qf + g0 * Dk;
        A* stg = st + g0 * CW;
        switch (std::min(sg, R - g0)) {
          case 1: score_rows<A, 1>(qg, Dk, kt, CW, scale, stg, nkv); break;
          case 2: score_rows<A, 2>(qg, Dk, kt, CW, scale, stg, nkv); break;
          case 3: score_rows<A, 3>(qg, Dk, kt, CW, scale, stg, nkv); break;
          default: score_rows<A, 4>(qg, Dk, kt, CW, scale, stg, nkv); break;
        }
      }
    }

    // online softmax, per query. The chunk's max by plain vmax (one instruction; a NaN score
    // it drops makes p, and so the row's sum, NaN: the row ends NaN, see `empty` below), the
    // rescale factors alpha of all R queries by one vector exp2 (a libm exp2 per query and a
    // NaN-propagating max had cost more than the score GEMM at Lq = 9).
    for (int64_t i = 0; i < R; ++i) {
      A* si = st + i * CW;
      for (int c = nv; c < nkv * W; ++c) si[c] = ninf;
      V mx = vload(si);
      for (int t = 1; t < nkv; ++t) mx = vmax<A>(mx, vload(si + t * W));
      alpha[i] = mb[i];  // the old max, until the exp2 below
      mb[i] = max_nan(mb[i], hmax<A>(mx));
    }
    for (int64_t i0 = 0; i0 < R; i0 += W)  // 0 while the old max is -inf
      vstore(alpha + i0, vexp2((vload(alpha + i0) - vload(mb + i0)) * log2e));
    for (int64_t i = 0; i < R; ++i) {
      A* si = st + i * CW;
      // (s - m) first, exact near the max: s * log2e - m * log2e (an FMA) would leave the
      // rounding error of m * log2e, which is huge for |s| near the top of the fp32 range
      const V mv = vset(mb[i]);
      V lsum = V{};
      for (int t = 0; t < nkv; ++t) {
        const V p = vexp2((vload(si + t * W) - mv) * log2e);
        vstore(si + t * W, p);
        lsum += p;
      }
      vstore(lv + i * W, vload(lv + i * W) * alpha[i] + lsum);
    }

    // P x V: value vectors three at a time for groups of up to kPv3Q queries, two above.
    // The V rows kPrefetchKeys ahead are prefetched here one row per key (RowPrefetch); once
    // all of a chunk's ~144 lines were asked for at once before P x V, which stalled on the
    // line fill buffers (Sapphire Rapids, perf: ~30% of the B = 1 cycles on the instruction
    // after them).
    const int64_t pg = group_len(R, kPvQ);
    for (int64_t qa = 0; qa < R; qa += pg) {
      const int qg = int(std::min<int64_t>(pg, R - qa));
      A* otq = ot + qa * ostride;
      const A* ptq = st + qa * CW;
      const RowPrefetch* pf = qa == 0 ? vpf_p : nullptr;
      if (vdirect)
        pv_block<A, T>(otq, ostride, alpha + qa, ptq, CW, 1, nv, vrows_t, voff, nd, narrow, qg,
                       nullptr, pf);
      else
        pv_block<A, A>(otq, ostride, alpha + qa, ptq, CW, 1, nv, vrows, voff, nd, narrow, qg,
                       nullptr, pf);
    }
  }

  const A inf = std::numeric_limits<A>::infinity();
  const int64_t BH = s.B * s.H;
  for (int64_t i = 0; i < R; ++i) {
    const A mi = mb[i];
    const A li = qlanes ? lv[i] : hsum<A>(vload(lv + i * W));
    // no attended key in this unit's range: the max is -inf and the sum 0. (A max of -inf
    // with a NaN sum is a row whose NaN scores the plain max dropped: NaN, not empty.)
    const bool empty = mi == ninf && li == li;
    const A inv = empty ? A(0) : A(1) / li;
    const A lse = empty ? inf : mi + std::log(li);
    // value vectors in order, whole (an overlapping tail vector rewrites equal values; lanes
    // past Dv of a row narrower than a vector land in orow's padding, never read). Stored
    // lane by lane, the row was read back by store_row's vector loads through failed
    // store-to-load forwarding: ~19% of the forward at Lk = 1 (Zen 4, perf).
    for (int64_t t = 0; t < nd; ++t) {
      const A* src = ot + i * ostride + t * W;
      if (narrow && t == nd - 1) std::memcpy(orow + voff[t], src, 4 * sizeof(A));
      else vstore(orow + voff[t], vload(src));
    }
    const int64_t row = bh * Lq + i0 + i;
    if (s.nsplit == 1) {
      store_row(static_cast<T*>(P.out) + row * Dv, orow, Dv, inv);
      static_cast<A*>(P.lse)[row] = lse;
    } else {
      // A split with no attended key contributes nothing to the merge: lse -inf there.
      const int64_t prow = sp * BH * Lq + row;
      A* o = static_cast<A*>(P.part_o) + prow * Dv;
      for (int64_t d = 0; d < Dv; ++d) o[d] = orow[d] * inv;
      static_cast<A*>(P.part_lse)[prow] = empty ? -inf : lse;
    }
  }
}

// Where the backward's dk / dv rows of a key chunk go (bwd_rows): kBuffer, added into the
// padded chunk buffer (row stride Dp), copied out to the output when the chunk is done;
// kDirect, written straight to the output rows (row stride D) by the first query block;
// kDirectAdd, added into those output rows by the later query blocks. Direct needs every key
// of the chunk attended and the inputs in the accumulation type.
enum RowsTo { kBuffer, kDirect, kDirectAdd };

// Rows out[idx[g]] (G keys, D head dims) += sum_i w[g * W + i] x[i] over the nrows rows x
// (row stride Dp) in the backward: dv (w = p, x = dO) and dk (w = ds * scale, x = q); `To`
// says where (RowsTo). Each output vector is loaded once (0 for kDirect), takes its FMAs and
// is stored once, so every mode sums a row's terms in the same order. A last block of 1-4 dims
// takes the 4-lane narrow tail on AVX-512 (kNarrowTail), as the forward's P x V: half a
// 16-lane FMA on Zen 4.
template <typename A, int G, RowsTo To>
static inline void bwd_rows(const A* w, const A* x, int64_t nrows, int64_t D, int64_t Dp,
                            const int32_t* idx, A* out) {
  constexpr bool Direct = To != kBuffer;
  constexpr int W = lanes<A>();
  const bool narrow = kNarrowTail && std::is_same<A, float>::value && D % W != 0 &&
                      D % W <= 4;
  const int64_t Df = narrow ? D / W * W : Dp;  // dims in full vectors
  for (int64_t dd = 0; dd < Df; dd += W) {
    Vec<A> acc[G];
    const int n = int(std::min<int64_t>(W, D - dd));  // Direct: lanes in the output row
    for (int g = 0; g < G; ++g) {
      if constexpr (To == kBuffer) acc[g] = vload(out + int64_t(idx[g]) * Dp + dd);
      else if constexpr (To == kDirectAdd) acc[g] = vload_n(out + int64_t(idx[g]) * D + dd, n);
      else acc[g] = Vec<A>{};
    }
    for (int64_t i = 0; i < nrows; ++i) {
      const Vec<A> xv = vload(x + i * Dp + dd);
      for (int g = 0; g < G; ++g) acc[g] += vset(w[g * W + i]) * xv;
    }
    if constexpr (Direct) {
      for (int g = 0; g < G; ++g) vstore_n(out + int64_t(idx[g]) * D + dd, acc[g], n);
    } else {
      for (int g = 0; g < G; ++g) vstore(out + int64_t(idx[g]) * Dp + dd, acc[g]);
    }
  }
  if constexpr (kNarrowTail && std::is_same<A, float>::value) {
    if (!narrow) return;
    const int64_t dd = Df;
    Vec4f acc[G];
    for (int g = 0; g < G; ++g) {
      acc[g] = Vec4f{};
      if constexpr (To == kBuffer)
        std::memcpy(&acc[g], out + int64_t(idx[g]) * Dp + dd, sizeof(Vec4f));
      else if constexpr (To == kDirectAdd)
        acc[g] = load4_n(out + int64_t(idx[g]) * D + dd, int(D - dd));
    }
    for (int64_t i = 0; i < nrows; ++i) {
      const Vec4f xv = vload4_as(x + i * Dp + dd);
      for (int g = 0; g < G; ++g) acc[g] += (w[g * W + i] - Vec4f{}) * xv;
    }
    for (int g = 0; g < G; ++g) {
      if constexpr (Direct) {
        store4_n(out + int64_t(idx[g]) * D + dd, acc[g], int(D - dd));
      } else {
        std::memcpy(out + int64_t(idx[g]) * Dp + dd, &acc[g], sizeof(Vec4f));
      }
    }
  }
}

// G keys of one query block in the backward: p and ds (lane vectors), dq accumulation
// (lanes = queries), then dk / dv rows (vectorised over the padded head dim) into dkc / dvc:
// the padded chunk buffers (kBuffer) or the output rows themselves (kDirect, kDirectAdd; see
// RowsTo). dk's rows take ds * scale (the order of PyTorch's autograd of s = (q k^T) * scale),
// so no mode scales a row afterwards.
template <typename A, int G, RowsTo To>
static inline void bwd_group(A scale, const A* qt, const A* dot, const A* lse2,
                             const A* delta, const A* kc, const A* vc, int64_t Dk, int64_t Dv,
                             const int32_t* idx, A* dqt, const A* qrow, const A* dorow,
                             int64_t nrows, int64_t Dkp, int64_t Dvp, A* dkc, A* dvc, A* lanebuf) {
  constexpr int W = lanes<A>();
  typedef Vec<A> V;
  V sacc[G], dpacc[G];
  const A* kr[G];
  const A* vr[G];
  for (int g = 0; g < G; ++g) {
    sacc[g] = V{};
    dpacc[g] = V{};
    kr[g] = kc + int64_t(idx[g]) * Dk;
    vr[g] = vc + int64_t(idx[g]) * Dv;
  }
  for (int64_t d = 0; d < Dk; ++d) {
    const V qv = vload(qt + d * W);
    for (int g = 0; g < G; ++g) sacc[g] += vset(kr[g][d]) * qv;
  }
  for (int64_t d = 0; d < Dv; ++d) {
    const V gv = vload(dot + d * W);
    for (int g = 0; g < G; ++g) dpacc[g] += vset(vr[g][d]) * gv;
  }
  const V l2 = vload(lse2), de = vload(delta);
  V ds[G];
  A* pl = lanebuf;
  A* dsl = lanebuf + G * W;
  for (int g = 0; g < G; ++g) {
    // s = (q . k) * scale, +-inf made NaN (s + 0 * s); p = 0 for rows with lse = +inf
    const V sg = sacc[g] * scale;
    const V p = vexp2(((sg + A(0) * sg) - l2) * A(1.4426950408889634));
    ds[g] = p * (dpacc[g] - de);
    vstore(pl + g * W, p);
    vstore(dsl + g * W, ds[g] * scale);
  }
  for (int64_t d = 0; d < Dk; ++d) {
    V acc = vload(dqt + d * W);
    for (int g = 0; g < G; ++g) acc += vset(kr[g][d]) * ds[g];
    vstore(dqt + d * W, acc);
  }
  // dv / dk rows of the G keys, a lane vector of head dims at a time: each dO (q) row vector
  // is loaded once and feeds G FMAs whose other operand is a broadcast p (ds) from memory.
  bwd_rows<A, G, To>(pl, dorow, nrows, Dv, Dvp, idx, dvc);
  bwd_rows<A, G, To>(dsl, qrow, nrows, Dk, Dkp, idx, dkc);
}

// Query blocks of at most kRowTail rows (fp32 on AVX2 / AVX-512: Lq = 1 .. 4, the 9th query of
// Lq = 9 on AVX2, the 17th of Lq = 17 on AVX-512) take bwd_group_rows below instead of
// bwd_group: bwd_group's score, dp and dq FMAs cost the same for 1 row as for a full block
// (lanes over queries), 72 vectors per key at Dk / Dv = 18 / 36, where per row with lanes over
// head dims and a horizontal-sum tree they cost ~11 (AVX-512) to ~21 (AVX2).
// The row limit as measured on AMD Zen 4 (1 thread, B = 16, Lk = 729, backward ms, medians of
// 3 interleaved processes, bwd_group -> bwd_group_rows): AVX-512 Lq = 1 19.8 -> 15.0, 2 20.5 ->
// 15.7, 3 18.8 -> 17.5, 4 20.7 -> 22.0 (slower: 3 rows), Lq = 17 36.6 -> 34.2; the AVX2 variant
// Lq = 1 17.3 -> 13.4, 4 19.6 -> 18.8, Lq = 9 30.3 -> 28.1.
#if FS_VEC_BYTES >= 32
static constexpr int64_t kRowTail = FS_VEC_BYTES == 64 ? 3 : 4;

// r[g] = the sum of the 8 lanes of a[g] (g < 8): a tree of 6 hadds and one cross-half add.
static inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Lane g (< G <= 8) of the result: row x (padded with zeros to a multiple of W, read whole)
// dotted with row r[g] (D elements, its last partial vector read by a masked load); lanes >= G:
// 0. On AVX-512 each 16-lane sum is first folded to 8 lanes.
template <int G>
static inline Vec<float> dots8(const float* x, const float* const* r, int64_t D) {
  constexpr int W = lanes<float>();
  Vec<float> acc[8];
  for (int g = 0; g < 8; ++g) acc[g] = Vec<float>{};
  for (int64_t dd = 0; dd < D; dd += W) {
    const int n = int(std::min<int64_t>(W, D - dd));
    const Vec<float> xv = vload(x + dd);
    for (int g = 0; g < G; ++g) acc[g] += vload_n(r[g] + dd, n) * xv;
  }
#if FS_VEC_BYTES == 64
  __m256 h[8];
  for (int g = 0; g < 8; ++g) {
    const __m512 a = (__m512)acc[g];
    h[g] = _mm256_add_ps(_mm512_castps512_ps256(a),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  return (Vec<float>)_mm512_zextps256_ps512(hsum8x8(h));
#else
  __m256 h[8];
  for (int g = 0; g < 8; ++g) h[g] = (__m256)acc[g];
  return (Vec<float>)hsum8x8(h);
#endif
}

// G keys (idx) of a query block of R <= kRowTail rows, one row at a time with lanes over head
// dims: s and dp by dots8 (a lane per key), p and ds as vectors over the G keys, the row's dq
// (padded row in dqr) += sum_g ds_g k_g, then the G keys' dk / dv rows by bwd_rows from the
// same lane buffer layout as bwd_group's (w[g * W + i]).
template <int G, RowsTo To>
static inline void bwd_group_rows(float scale, const float* lse2, const float* delta,
                                  const float* kc, const float* vc, int64_t Dk, int64_t Dv,
                                  const int32_t* idx, float* dqr, const float* qrow,
                                  const float* dorow, int64_t R, int64_t Dkp, int64_t Dvp,
                                  float* dkc, float* dvc, float* lanebuf) {
  constexpr int W = lanes<float>();
  const float* kr[G];
  const float* vr[G];
  for (int g = 0; g < G; ++g) {
    kr[g] = kc + int64_t(idx[g]) * Dk;
    vr[g] = vc + int64_t(idx[g]) * Dv;
  }
  float* pl = lanebuf;
  float* dsl = lanebuf + G * W;
  for (int64_t i = 0; i < R; ++i) {
    const Vec<float> sg = dots8<G>(qrow + i * Dkp, kr, Dk) * scale;
    const Vec<float> dp = dots8<G>(dorow + i * Dvp, vr, Dv);
    // as bwd_group: +-inf scores made NaN, p = 0 for rows with lse = +inf
    const Vec<float> p = vexp2(((sg + 0.0f * sg) - lse2[i]) * 1.4426950408889634f);
    const Vec<float> ds = p * (dp - delta[i]);
    for (int g = 0; g < G; ++g) {
      pl[g * W + i] = p[g];
      dsl[g * W + i] = ds[g] * scale;
    }
    float* dq = dqr + i * Dkp;
    for (int64_t dd = 0; dd < Dk; dd += W) {
      const int n = int(std::min<int64_t>(W, Dk - dd));
      Vec<float> acc = vload(dq + dd);
      for (int g = 0; g < G; ++g) acc += vset(ds[g]) * vload_n(kr[g] + dd, n);
      vstore(dq + dd, acc);
    }
  }
  bwd_rows<float, G, To>(pl, dorow, R, Dv, Dvp, idx, dvc);
  bwd_rows<float, G, To>(dsl, qrow, R, Dk, Dkp, idx, dkc);
}
#else
static constexpr int64_t kRowTail = 0;
template <int G, RowsTo To>
static inline void bwd_group_rows(float, const float*, const float*, const float*, const float*,
                                  int64_t, int64_t, const int32_t*, float*, const float*,
                                  const float*, int64_t, int64_t, int64_t, float*, float*,
                                  float*) {}
#endif

// The key groups of one query block over a chunk's nv attended keys: 8 at a time, then 4, then
// 1, each by group(G, D, t) (integral constants: the group's keys, and where its dk / dv rows
// go: kBuffer when the chunk has a masked key, else kDirect for the first query block and
// kDirectAdd for the others); the first block's 8-key groups call prefetch(t) first.
// Inlining as measured (AMD Zen 4, 1 thread, B = 16, Lk = 729, backward ms, medians of 3
// interleaved processes): this loop always inlined into bwd_unit_t, each group a function of
// its own (a noinline lambda per (G, D) with bwd_group / bwd_group_rows inlined into it), which
// is the code GCC had made of the two hand-written loops this replaced: the same times
// (AVX-512 Lq = 1 / 2 / 9 / 17: 13.5 / 15.3 / 21.8 / 31.5 vs 13.9 / 15.1 / 22.3 / 31.5). Left
// to GCC, a first version of this helper had made Lq = 1 13.2 -> 17.6; every group inlined,
// Lq = 9 got 22.3 -> 20.4 but Lq = 2 15.1 -> 17.5 and the AVX2 variant's Lq = 1 12.9 -> 14.1;
// only the block path's group inlined, Lq = 9 20.6 but Lq = 2 16.6.
template <typename Prefetch, typename Group>
__attribute__((always_inline)) static inline void key_groups(int nv, bool direct, int64_t qb,
                                                            Prefetch& prefetch, Group&& group) {
  auto run = [&](auto to) __attribute__((always_inline)) {
    int t = 0;
    for (; t + 8 <= nv; t += 8) {
      if (qb == 0) prefetch(t);
      group(std::integral_constant<int, 8>{}, to, t);
    }
    for (; t + 4 <= nv; t += 4) group(std::integral_constant<int, 4>{}, to, t);
    for (; t < nv; ++t) group(std::integral_constant<int, 1>{}, to, t);
  };
  if (!direct)
    run(std::integral_constant<RowsTo, kBuffer>{});
  else if (qb == 0)
    run(std::integral_constant<RowsTo, kDirect>{});
  else
    run(std::integral_constant<RowsTo, kDirectAdd>{});
}

// One backward unit: (b, h) and a range of keys, every query. dk / dv of the range are
// complete here; dq is this range's share (the whole dq when nsplit == 1).
template <typename T, typename A>
static void bwd_unit_t(const BwdParams& P, int64_t u) {
  constexpr int W = lanes<A>();
  const Shape& s = P.s;
  const int64_t sp = u % s.nsplit;
  const int64_t bh = u / s.nsplit;
  const int64_t b = bh / s.H;
  const int64_t Lq = s.Lq, Lk = s.Lk, Dk = s.Dk, Dv = s.Dv;
  const int64_t nqb = (Lq + W - 1) / W;
  const int64_t Dkp = (Dk + W - 1) / W * W, Dvp = (Dv + W - 1) / W * W;
  const int64_t j0 = sp * s.split_len, j1 = std::min(Lk, j0 + s.split_len);
  const T* q = static_cast<const T*>(P.q) + bh * Lq * Dk;
  const T* go = static_cast<const T*>(P.dout) + bh * Lq * Dv;
  const T* o = static_cast<const T*>(P.out) + bh * Lq * Dv;
  const A* lse = static_cast<const A*>(P.lse) + bh * Lq;
  const T* k = static_cast<const T*>(P.k) + bh * Lk * Dk;
  const T* v = static_cast<const T*>(P.v) + bh * Lk * Dv;
  T* dk = static_cast<T*>(P.dk) + bh * Lk * Dk;
  T* dv = static_cast<T*>(P.dv) + bh * Lk * Dv;
  const bool* mrow = P.mask ? P.mask + b * Lk : nullptr;
  constexpr bool kConvert = !std::is_same<T, A>::value;
  const T* k_all = static_cast<const T*>(P.k);  // every head's rows, for the prefetch
  const T* v_all = static_cast<const T*>(P.v);
  const int64_t rows_all = s.B * s.H * Lk;

  const int64_t n_qt = nqb * Dk * W, n_dot = nqb * Dv * W, n_l = nqb * W;
  const int64_t n_qr = nqb * W * Dkp, n_dor = nqb * W * Dvp;
  const int64_t n_dkc = kChunk * Dkp, n_dvc = kChunk * Dvp, n_lane = 2 * kGroup * W;
  const int64_t n_kb = kConvert ? kChunk * Dk : 0, n_vb = kConvert ? kChunk * Dv : 0;
  const int64_t n_dqr = kRowTail * Dkp;  // dq rows of a bwd_group_rows block
  A* qt = scratch<A>(2 * n_qt + n_dot + 2 * n_l + n_qr + n_dor + n_dkc + n_dvc + n_lane + n_kb +
                     n_vb + n_qt + n_dqr + W);
  A* dqt = qt + n_qt;
  A* dot = dqt + n_qt;
  A* lse2 = dot + n_dot;
  A* delta = lse2 + n_l;
  A* qrow = delta + n_l;
  A* dorow = qrow + n_qr;
  A* dkc = dorow + n_dor;
  A* dvc = dkc + n_dkc;
  A* lanebuf = dvc + n_dvc;
  A* kb = lanebuf + n_lane;
  A* vb = kb + n_kb;
  // dq of one chunk, added to dqt when the chunk is done: a two-level sum, whose rounding
  // error grows with the chunk count instead of the key count (Lk = 3645 summed key by key
  // made dq ~6x less accurate than PyTorch's)
  A* dqc = vb + n_vb;
  A* dqr = dqc + n_qt;
  int32_t idx[kChunk];

  const A scale = A(P.scale);
  std::fill(qt, qt + 2 * n_qt + n_dot, A(0));  // qt, dqt, dot
  std::fill(lse2, lse2 + n_l, std::numeric_limits<A>::infinity());  // padded lanes: p = 0
  std::fill(delta, delta + n_l + n_qr + n_dor, A(0));  // delta, qrow, dorow
  for (int64_t i = 0; i < Lq; ++i) {
    const int64_t qb = i / W, lane = i % W;
    for (int64_t d = 0; d < Dk; ++d) {
      const A x = load_elem(q + i * Dk + d);
      qt[(qb * Dk + d) * W + lane] = x;
      qrow[i * Dkp + d] = x;
    }
    A dsum = 0;
    for (int64_t d = 0; d < Dv; ++d) {
      const A g = load_elem(go + i * Dv + d);
      dot[(qb * Dv + d) * W + lane] = g;
      dorow[i * Dvp + d] = g;
      dsum += g * load_elem(o + i * Dv + d);
    }
    delta[i] = dsum;
    lse2[i] = lse[i];  // natural units: p = 2^((s - lse) log2e)
  }

  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t kc = std::min(kChunk, j1 - c0);
    const int nv = gather_keys(mrow, c0, kc, idx);
    // every key attended: the groups write dk / dv rows themselves, the first query block
    // (kDirect) and then the others (kDirectAdd), with no chunk buffers to clear, add into and
    // copy out. Clearing them and copying them out had cost ~15% of the backward with two
    // query blocks (AVX2 at Lq = 9, AMD Zen 3; perf), mostly in the copy's stores.
    const bool direct = !kConvert && nv == kc;
    if (!direct) {
      std::fill(dkc, dkc + kc * Dkp, A(0));
      std::fill(dvc, dvc + kc * Dvp, A(0));
    }
    if (nv > 0) {
      std::fill(dqc, dqc + n_qt, A(0));
      const A* kcp = chunk_rows<T, A>(k + c0 * Dk, kc, Dk, kb);
      const A* vcp = chunk_rows<T, A>(v + c0 * Dv, kc, Dv, vb);
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t nrows = std::min<int64_t>(W, Lq - qb * W);
        const A* qtb = qt + qb * Dk * W;
        const A* dotb = dot + qb * Dv * W;
        A* dqtb = dqc + qb * Dk * W;
        const A* qrb = qrow + qb * W * Dkp;
        const A* dorb = dorow + qb * W * Dvp;
        A* dko = direct ? reinterpret_cast<A*>(dk + c0 * Dk) : dkc;
        A* dvo = direct ? reinterpret_cast<A*>(dv + c0 * Dv) : dvc;
        // rows three chunks ahead, an 8-key group's share at a time (first query block only)
        auto prefetch = [&](int t) {
          if (!P.prefetch) return;
          const int64_t r = bh * Lk + c0 + 3 * kChunk + t * kc / nv;
          prefetch_rows(k_all, r, 8 * kc / nv + 1, rows_all, Dk);
          prefetch_rows(v_all, r, 8 * kc / nv + 1, rows_all, Dv);
        };
        if constexpr (std::is_same<A, float>::value && kRowTail > 0) {
          if (nrows <= kRowTail) {  // a few rows: one at a time, lanes over head dims
            std::fill(dqr, dqr + nrows * Dkp, A(0));
            auto group = [&](auto g, auto to, int t) __attribute__((noinline)) {
              bwd_group_rows<decltype(g)::value, decltype(to)::value>(
                  scale, lse2 + qb * W, delta + qb * W, kcp, vcp, Dk, Dv, idx + t, dqr, qrb, dorb,
                  nrows, Dkp, Dvp, dko, dvo, lanebuf);
            };
            key_groups(nv, direct, qb, prefetch, group);
            for (int64_t i = 0; i < nrows; ++i)  // into the chunk's dq, lanes = queries
              for (int64_t d = 0; d < Dk; ++d) dqtb[d * W + i] += dqr[i * Dkp + d];
            continue;
          }
        }
        auto group = [&](auto g, auto to, int t) __attribute__((noinline)) {
          bwd_group<A, decltype(g)::value, decltype(to)::value>(
              scale, qtb, dotb, lse2 + qb * W, delta + qb * W, kcp, vcp, Dk, Dv, idx + t, dqtb,
              qrb, dorb, nrows, Dkp, Dvp, dko, dvo, lanebuf);
        };
        key_groups(nv, direct, qb, prefetch, group);
      }
      for (int64_t e = 0; e < n_qt; e += W) vstore(dqt + e, vload(dqt + e) + vload(dqc + e));
    }
    for (int64_t j = 0; j < (direct ? 0 : kc); ++j) {
      T* dkr = dk + (c0 + j) * Dk;
      T* dvr = dv + (c0 + j) * Dv;
      store_row(dkr, dkc + j * Dkp, Dk, A(1));  // dk's rows hold ds * scale already
      store_row(dvr, dvc + j * Dvp, Dv, A(1));
    }
  }

  for (int64_t i = 0; i < Lq; ++i) {
    const A* src = dqt + (i / W) * Dk * W + i % W;
    if (s.nsplit == 1) {
      T* dst = static_cast<T*>(P.dq) + (bh * Lq + i) * Dk;
      for (int64_t d = 0; d < Dk; ++d) store_elem(dst + d, src[d * W] * scale);
    } else {
      A* dst = static_cast<A*>(P.part_dq) + ((sp * s.B * s.H + bh) * Lq + i) * Dk;
      for (int64_t d = 0; d < Dk; ++d) dst[d] = src[d * W] * scale;
    }
  }
}

static void fwd_unit(const FwdParams& P, DType dt, int64_t u) {
  switch (dt) {
    case DType::f32: return fwd_unit_t<float, float>(P, u);
    case DType::f64: return fwd_unit_t<double, double>(P, u);
    case DType::f16: return fwd_unit_t<c10::Half, float>(P, u);
    case DType::bf16: return fwd_unit_t<c10::BFloat16, float>(P, u);
  }
}

static void bwd_unit(const BwdParams& P, DType dt, int64_t u) {
  switch (dt) {
    case DType::f32: return bwd_unit_t<float, float>(P, u);
    case DType::f64: return bwd_unit_t<double, double>(P, u);
    case DType::f16: return bwd_unit_t<c10::Half, float>(P, u);
    case DType::bf16: return bwd_unit_t<c10::BFloat16, float>(P, u);
  }
}
