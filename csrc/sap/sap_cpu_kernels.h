// The elementwise passes of the CPU SAP kernels, written once and compiled once per instruction
// set: sap_cpu.cpp includes this file inside namespace flashsloth::sap::<isa>, under the
// matching `#pragma GCC target` (csrc/README.md, "The ISA multi-include"). No include guard, on
// purpose; and no #include here, so that only this file's own functions take the region's
// target (every header is included before).
//
// The loops are plain C++ that GCC vectorises at the region's width: dot products keep kLanes
// independent partial sums (a fixed summation order without -ffast-math), stores of 16-bit
// results round with integer ops. Built for the x86-64 baseline alone (SSE2), the backward's
// pass took 10-12 ms at B = 4 on one core, against ~5 ms as AVX-512.
//
// Elementwise work runs in float32 (float64 for float64 inputs). None of the sums depends on
// the thread count: a window (forward) or a strip of windows (backward) is handled by one
// call, and sums across rows go through per-strip partials added up in strip order by the
// caller.

static constexpr int kLanes = 16;

template <typename acc_t>
static inline acc_t reduce_lanes(const acc_t* acc) {
  acc_t t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = acc[j];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

// w2s . (relu(z + b1) * mask) for one row of z (b2 is the caller's). w2s already holds
// w2 * dropout_scale when there is a mask, so the mask enters as a 0/1 factor.
template <bool kMasked, typename acc_t>
static inline acc_t row_score(const acc_t* z, const acc_t* b1, const acc_t* w2s,
                              const bool* mask, int64_t Ch) {
  // bytes, not bools: GCC does not vectorise loads of bool
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
  acc_t acc[kLanes] = {};
  auto term = [&](int64_t k) {
    const acc_t v = z[k] + b1[k];
    // relu as torch.relu: NaN stays NaN (the numeric contract; `v > 0 ? v : 0` would turn a
    // NaN in w1 / b1 / x into a finite score). GCC lowers this to a NaN-propagating max.
    acc_t a = v < acc_t(0) ? acc_t(0) : v;
    if constexpr (kMasked) a *= static_cast<acc_t>(m[k]);
    return w2s[k] * a;
  };
  int64_t k = 0;
  for (; k + kLanes <= Ch; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += term(k + j);
  for (int j = 0; k + j < Ch; ++j) acc[j] += term(k + j);
  return reduce_lanes(acc);
}

template <typename acc_t>
static inline acc_t dot_row(const acc_t* x, const acc_t* g, int64_t C) {
  acc_t acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += g[c + j] * x[c + j];
  for (int j = 0; c + j < C; ++j) acc[j] += g[c + j] * x[c + j];
  return reduce_lanes(acc);
}

// x where v > 0, else 0. The gate is a bit mask from an integer compare of v's bits (positive
// floats are exactly the positive integers): GCC (by default -ftrapping-math) will not
// if-convert a floating-point compare-and-select, which leaves the loop scalar.
template <typename acc_t>
static inline acc_t keep_if_positive(acc_t v, acc_t x) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
  bits_t vb, xb;
  std::memcpy(&vb, &v, sizeof(acc_t));
  std::memcpy(&xb, &x, sizeof(acc_t));
  xb &= -static_cast<bits_t>(vb > 0);
  acc_t r;
  std::memcpy(&r, &xb, sizeof(acc_t));
  return r;
}

// acc_t -> D for stores in the hot loops. bfloat16 is rounded to nearest even with integer
// ops (c10's conversion branches on NaN, which keeps loops scalar); same result, NaN -> 0x7FC0.
template <typename D, typename acc_t>
static inline D store_as(acc_t v) {
  if constexpr (std::is_same_v<D, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t nan = -static_cast<uint32_t>((u & 0x7fffffffu) > 0x7f800000u);
    const uint32_t r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & ~nan;
    return c10::BFloat16(static_cast<uint16_t>(r | (0x7fc0u & nan)), c10::BFloat16::from_bits());
  } else {
    return static_cast<D>(v);
  }
}

// In place: s[0..n) -> softmax(s), max-subtracted so large scores stay finite.
template <typename acc_t>
static inline void softmax_inplace(acc_t* s, int64_t n) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
}

template <bool kMasked, typename T, typename acc_t>
static void fwd_windows(const FwdArgs& a, int64_t begin, int64_t end) {
  const Windows& win = a.win;
  const int64_t N = a.N, C = a.C, Ch = a.Ch;
  const acc_t* z = static_cast<const acc_t*>(a.z);
  const T* x = static_cast<const T*>(a.x);
  const acc_t* b1 = static_cast<const acc_t*>(a.sc.b1);
  const acc_t* w2s = static_cast<const acc_t*>(a.sc.w2s);
  const acc_t b2 = static_cast<acc_t>(a.sc.b2);
  T* out = static_cast<T*>(a.out);
  std::vector<int64_t> idx(win.kh * win.kw);
  std::vector<acc_t> s(win.kh * win.kw), acc(C);
  for (int64_t bg = begin; bg < end; ++bg) {
    const int64_t b = bg / win.G, g = bg % win.G;
    const int64_t n = win.patches(g, idx.data());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = b * N + idx[i];
      s[i] = row_score<kMasked>(z + r * Ch, b1, w2s, kMasked ? a.mask + r * Ch : nullptr, Ch) +
             b2;
    }
    softmax_inplace(s.data(), n);
    acc_t* ac = acc.data();
    std::fill(ac, ac + C, acc_t(0));
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = x + (b * N + idx[i]) * C;
      const acc_t al = s[i];
      for (int64_t c = 0; c < C; ++c) ac[c] += al * static_cast<acc_t>(xr[c]);
    }
    T* o = out + bg * C;
    for (int64_t c = 0; c < C; ++c) o[c] = store_as<T>(ac[c]);
  }
}

// Backward over rows [r0, r1): dz = ds * w2 * mask * scale * [z + b1 > 0], written over z
// itself when D is acc_t (each element is read before it is written) or into dz_out; with
// kPart also accumulates dw2 += ds * a (a = relu(z + b1) * mask * scale) and db1 += dz (from dz
// before any rounding to D).
template <bool kMasked, bool kPart, typename acc_t, typename D>
static inline void bwd_rows(acc_t* z, D* dz_out, const acc_t* ds, const bool* mask,
                            const acc_t* b1, const acc_t* w2s, acc_t scale, int64_t r0,
                            int64_t r1, int64_t Ch, acc_t* __restrict dw2,
                            acc_t* __restrict db1) {
  constexpr bool kInPlace = std::is_same_v<acc_t, D>;
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* zr = z + r * Ch;
    D* dzr = dz_out + r * Ch;
    // bytes, not bools: GCC does not vectorise loads of bool
    const uint8_t* m = kMasked ? reinterpret_cast<const uint8_t*>(mask) + r * Ch : nullptr;
    const acc_t d = ds[r];
    const acc_t d_scale = d * scale;
    for (int64_t k = 0; k < Ch; ++k) {
      const acc_t v = zr[k] + b1[k];
      const acc_t mk = kMasked ? static_cast<acc_t>(m[k]) : acc_t(1);
      const acc_t g = keep_if_positive(v, d * w2s[k] * mk);
      if constexpr (kPart) {
        dw2[k] += d_scale * keep_if_positive(v, v * mk);
        db1[k] += g;
      }
      if constexpr (kInPlace) {
        zr[k] = g;
      } else {
        dzr[k] = store_as<D>(g);
      }
    }
  }
}

// The whole backward between the GEMMs for strips [begin, end) (a strip: kh grid rows of one
// image, rows [r0, r1) of x and z, contiguous). Per window of the strip: scores from z, softmax
// alpha, dalpha_i = g . x_i, ds_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j) and (dx set)
// dx_i = alpha_i g, the direct term the dx GEMM later accumulates onto. Then bwd_rows over the
// strip's rows while their z is still in cache, into the strip's own partials (part set).
template <bool kMasked, bool kPart, typename acc_t, typename D>
static void bwd_strips(const BwdArgs& a, int64_t begin, int64_t end) {
  const Windows& win = a.win;
  const int64_t N = a.N, C = a.C, Ch = a.Ch;
  acc_t* z = static_cast<acc_t*>(a.z);
  D* dz = static_cast<D*>(a.dz);
  const acc_t* x = static_cast<const acc_t*>(a.x);
  const acc_t* gout = static_cast<const acc_t*>(a.gout);
  const acc_t* b1 = static_cast<const acc_t*>(a.sc.b1);
  const acc_t* w2s = static_cast<const acc_t*>(a.sc.w2s);
  const acc_t b2 = static_cast<acc_t>(a.sc.b2), scale = static_cast<acc_t>(a.sc.scale);
  acc_t* ds = static_cast<acc_t*>(a.ds);
  D* dx = static_cast<D*>(a.dx);
  const int64_t wmax = win.kh * win.kw;
  std::vector<int64_t> idx(wmax);
  std::vector<acc_t> alpha(wmax), dalpha(wmax);
  for (int64_t st = begin; st < end; ++st) {
    const int64_t b = st / win.Gh, gi = st % win.Gh;
    for (int64_t g = gi * win.Gw; g < (gi + 1) * win.Gw; ++g) {
      const int64_t n = win.patches(g, idx.data());
      const acc_t* gw = gout + (b * win.G + g) * C;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = b * N + idx[i];
        alpha[i] = row_score<kMasked>(z + r * Ch, b1, w2s, kMasked ? a.mask + r * Ch : nullptr,
                                      Ch) + b2;
        dalpha[i] = dot_row(x + r * C, gw, C);
      }
      softmax_inplace(alpha.data(), n);
      acc_t inner = 0;
      for (int64_t i = 0; i < n; ++i) inner += alpha[i] * dalpha[i];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = b * N + idx[i];
        ds[r] = alpha[i] * (dalpha[i] - inner);
        if (dx != nullptr) {
          D* d = dx + r * C;
          const acc_t al = alpha[i];
          for (int64_t c = 0; c < C; ++c) d[c] = store_as<D>(al * gw[c]);
        }
      }
    }
    const int64_t r0 = b * N + gi * win.kh * win.W;
    const int64_t r1 = b * N + std::min(win.H, (gi + 1) * win.kh) * win.W;
    acc_t* p = kPart ? static_cast<acc_t*>(a.part) + st * 2 * Ch : nullptr;
    bwd_rows<kMasked, kPart, acc_t, D>(z, dz, ds, a.mask, b1, w2s, scale, r0, r1, Ch, p,
                                       kPart ? p + Ch : nullptr);
  }
}

// Entry points (one per variant; sap_cpu.cpp runs them under at::parallel_for).
static void fwd_range(const FwdArgs& a, int64_t begin, int64_t end) {
  auto run = [&](auto t, auto acc) {
    using T = decltype(t);
    using acc_t = decltype(acc);
    if (a.mask != nullptr) fwd_windows<true, T, acc_t>(a, begin, end);
    else fwd_windows<false, T, acc_t>(a, begin, end);
  };
  switch (a.t) {
    case DType::f32: run(float{}, float{}); break;
    case DType::f64: run(double{}, double{}); break;
    case DType::f16: run(c10::Half{}, float{}); break;
    case DType::bf16: run(c10::BFloat16{}, float{}); break;
  }
}

static void bwd_range(const BwdArgs& a, int64_t begin, int64_t end) {
  auto run = [&](auto d, auto acc) {
    using D = decltype(d);
    using acc_t = decltype(acc);
    const bool masked = a.mask != nullptr, part = a.part != nullptr;
    if (masked && part) bwd_strips<true, true, acc_t, D>(a, begin, end);
    else if (masked) bwd_strips<true, false, acc_t, D>(a, begin, end);
    else if (part) bwd_strips<false, true, acc_t, D>(a, begin, end);
    else bwd_strips<false, false, acc_t, D>(a, begin, end);
  };
  switch (a.d) {
    case DType::f32: run(float{}, float{}); break;
    case DType::f64: run(double{}, double{}); break;
    case DType::f16: run(c10::Half{}, float{}); break;
    case DType::bf16: run(c10::BFloat16{}, float{}); break;
  }
}
