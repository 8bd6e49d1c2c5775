// Lane arithmetic shared by every CPU kernel.
//
// A "lane value" V is either `float` (one row) or `vf` (kLanes rows, or kLanes columns of one row: one vector
// register, 16 floats with AVX-512, 8 with AVX2, 4 with SSE), written with GCC/Clang vector extensions so one
// source compiles to AVX-512, AVX2 or SSE code depending on -march.
// exp_ is the Cephes single-precision algorithm (Cody-Waite range reduction and a minimax polynomial,
// about 1 ulp), exp2_ the same polynomial scheme for 2^y without the reduction; both branch-free so that
// they vectorise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

namespace calibkern::cpu {

#if defined(__AVX512F__)
constexpr size_t kRegisterBytes = 64;
#elif defined(__AVX__)
constexpr size_t kRegisterBytes = 32;
#else
constexpr size_t kRegisterBytes = 16;
#endif
/// Floats per vector register: 16 with AVX-512, 8 with AVX, 4 otherwise. A lane value twice the register
/// width spills (and every opaque value, `rounded`, goes through memory): 16 lanes on AVX2 ran the kernels
/// 6–7× slower than 8.
constexpr int kLanes = (int)(kRegisterBytes / 4);
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef double vd __attribute__((vector_size(8 * kLanes)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kLanes)));

template <class V> struct Lane;
// S accumulates a sum over one row's K values: float64 for a long row (K up to 262144), float32 for the
// K ≤ 64 values of a lane-wise row group (the float32 reference sums those in float32 too; float64 lanes
// would cost two conversions and twice the registers per element).
template <> struct Lane<float> {
  using I = int32_t;   // lane integer type
  using D = double;    // lane float64 accumulator type
  using S = double;    // row-sum accumulator
  static constexpr int n = 1;
};
template <> struct Lane<vf> {
  using I = vi;
  using D = vd;
  using S = vf;
  static constexpr int n = kLanes;
};

// ---- conversions between lane types ------------------------------------------------------------------
inline int32_t as_bits(float x) { int32_t i; std::memcpy(&i, &x, 4); return i; }
inline vi as_bits(vf x) { return (vi)x; }
inline float from_bits(int32_t i) { float x; std::memcpy(&x, &i, 4); return x; }
inline vf from_bits(vi i) { return (vf)i; }
inline int32_t trunc_int(float x) { return (int32_t)x; }
inline vi trunc_int(vf x) { return __builtin_convertvector(x, vi); }
inline float to_float(int32_t i) { return (float)i; }
inline vf to_float(vi i) { return __builtin_convertvector(i, vf); }
inline double to_double(float x) { return x; }
inline vd to_double(vf x) { return __builtin_convertvector(x, vd); }
inline float narrow_lanes(double x) { return (float)x; }
inline vf narrow_lanes(const vd& x) { return __builtin_convertvector(x, vf); }
inline vf narrow_lanes(const vf& x) { return x; }
template <class V> inline typename Lane<V>::S row_sum_term(V x) { return x; }

template <class V> inline V splat(float s) { return V{} + s; }
template <class V> inline typename Lane<V>::I splat_int(int32_t s) { return typename Lane<V>::I{} + s; }

// lane `i` of a lane value, and a lane value from memory
inline float lane(float x, int) { return x; }
inline float lane(const vf& x, int i) { return x[i]; }
inline int32_t lane(int32_t x, int) { return x; }
inline int32_t lane(const vi& x, int i) { return x[i]; }
inline double lane(double x, int) { return x; }
inline double lane(const vd& x, int i) { return x[i]; }
/// {0, 1, …, 15}
inline vi lane_index() { vi v; for (int i = 0; i < kLanes; ++i) v[i] = i; return v; }
template <class V> inline V load_lanes(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <class V> inline typename Lane<V>::I load_lanes(const int32_t* p) {
  typename Lane<V>::I v; std::memcpy(&v, p, sizeof(v)); return v;
}

// ---- element loads: fp32 / bf16 / fp16 storage, fp32 math ----------------------------------------------
inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) {
  uint16_t h; std::memcpy(&h, p, 2); return from_bits((int32_t)((uint32_t)h << 16));
}
inline float load1(const c10::Half* p) {
#ifdef __FLT16_MAX__
  _Float16 h; std::memcpy(&h, p, 2); return (float)h;
#else
  return static_cast<float>(*p);
#endif
}

// kLanes consecutive elements
inline vf load_vector(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline vf load_vector(const c10::BFloat16* p) {
  vu16 h; std::memcpy(&h, p, sizeof(h));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline vf load_vector(const c10::Half* p) {
#ifdef __FLT16_MAX__
  typedef _Float16 vh __attribute__((vector_size(2 * kLanes)));
  vh h; std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vf);
#else
  vf v;
  for (int i = 0; i < kLanes; ++i) v[i] = load1(p + i);
  return v;
#endif
}

// ---- scaled logits ---------------------------------------------------------------------------------
/// v, as an opaque value: the compiler may not fuse the operation that produced it into the next one
/// (with -ffp-contract=fast, x · inv_t − m would become one FMA and z would not be the rounded float32
/// product the reference computes, which breaks ties between equal logits).
template <class V> inline V rounded(V v) {
#if defined(__x86_64__) || defined(__i386__)
  static_assert(sizeof(V) <= kRegisterBytes, "a lane value fits one vector register (kLanes)");
  __asm__("" : "+v"(v));
#else
  __asm__("" : "+m"(v));
#endif
  return v;
}

/// z = float(x) · inv_t for one element and for kLanes consecutive elements
template <class T> inline float scaled1(const T* p, float inv_t) { return rounded(load1(p) * inv_t); }
template <class T> inline vf scaled_vector(const T* p, float inv_t) { return rounded(load_vector(p) * inv_t); }

constexpr float kLog2e = 1.44269504088896341f;

// ---- math -------------------------------------------------------------------------------------------
template <class V> inline V vmax(V a, V b) { return a > b ? a : b; }
template <class V> inline V vmin(V a, V b) { return a < b ? a : b; }

constexpr float kRoundMagic = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer in the low mantissa bits

/// Horner's rule from the partial value p: p x^k + c₁ x^{k−1} + … + c_k (one FMA a coefficient with
/// -ffp-contract=fast).
template <class V> inline V horner(V p, V) { return p; }
template <class V, class... C> inline V horner(V p, V x, float c, C... rest) { return horner(p * x + c, x, rest...); }

/// c₀ x^n + c₁ x^{n−1} + … + c_n
template <class V, class... C> inline V polynomial(V x, float c0, C... rest) {
  return horner(splat<V>(c0), x, rest...);
}

/// y · 2^n for the integer-valued n = t − kRoundMagic (n sits in t's low mantissa bits), n ∈ [−150, 127],
/// with correct underflow through the subnormals on every instruction set: with AVX-512 one vscalefps;
/// otherwise two normal powers of two, 2^⌊n/2⌋ · 2^(n−⌊n/2⌋), the first product exact and the second rounded
/// once (as vscalefps rounds), so an AVX2 build gives the same subnormal exp as an AVX-512 one.
template <class V> inline V scale_by_pow2(V y, V n, [[maybe_unused]] V t) {
#ifdef __AVX512F__
  if constexpr (Lane<V>::n == 1) return _mm_cvtss_f32(_mm_scalef_ss(_mm_set_ss(y), _mm_set_ss(n)));
  else return (vf)_mm512_scalef_ps((__m512)y, (__m512)n);
#else
  const auto k = as_bits(t) - as_bits(kRoundMagic);  // n as an integer
  const auto half = k >> 1;
  return y * from_bits((half + 127) << 23) * from_bits((k - half + 127) << 23);
#endif
}

/// exp(x) in float32, ~1 ulp, for finite x ≤ 88 (−inf gives 0): Cephes' Cody-Waite range reduction and
/// minimax polynomial.
template <class V> inline V exp_(V x) {
  const float lo = -104.0f;  // exp(−104) < 2^−150 rounds to 0
  V xc = vmin(vmax(x, splat<V>(lo)), splat<V>(88.0f));
  V t = xc * kLog2e + kRoundMagic;
  V n = t - kRoundMagic;                           // round(x / ln 2)
  V r = xc - n * 0.693359375f;                     // Cody-Waite: ln 2 = C1 + C2
  r = r - n * -2.12194440e-4f;
  V p = polynomial(r, 1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                   5.0000001201e-1f);
  return scale_by_pow2(p * (r * r) + r + 1.0f, n, t);
}

/// 2^y in float32, ~2 ulp, for y ∈ [−126, 127]: y = n + f with n = round(y), |f| ≤ 1/2, and
/// 2^f = 1 + f · P(f), P a degree-5 minimax fit of (2^f − 1)/f. No range reduction by a split ln 2: where
/// the caller's y is itself a rounded product, 2^y carries that product's relative error times |y| ln 2
/// (for exp(x) as 2^{x log₂e}: use exp_ where that matters).
template <class V> inline V exp2_(V y) {
  V t = y + kRoundMagic;
  V n = t - kRoundMagic;
  V f = y - n;
  V p = polynomial(f, 1.5353361960e-4f, 1.3398875017e-3f, 9.6184369177e-3f, 5.5503323674e-2f, 2.4022647738e-1f,
                   6.9314718246e-1f);
  return scale_by_pow2(p * f + 1.0f, n, t);
}

/// log(1 + f) + e · ln 2 for f ∈ [√½ − 1, √2 − 1] and an integer-valued e: Cephes' logf,
/// f − f²/2 + f³ P(f) with ln 2 split in two (about 1 ulp).
template <class V> inline V log_reduced(V f, V e) {
  const V z = f * f;
  V y = polynomial(f, 7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                   -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f) * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (f + y) + e * 0.693359375f;
}

/// log(x) in float32 for a positive normal x: x = 2^e · a with a ∈ [√½, √2), then log_reduced(a − 1, e).
template <class V> inline V log_(V x) {
  const auto bits = as_bits(x);
  auto e = ((bits >> 23) & 0xff) - 126;                       // x = 2^e · a', a' ∈ [½, 1)
  const V a = from_bits((bits & 0x007fffff) | 0x3f000000);
  const auto small = a < 0.70710678f;
  e = small ? e - 1 : e;
  return log_reduced(small ? a + a - 1.0f : a - 1.0f, to_float(e));
}

/// log(1 + x) in float32 for x ≥ 0, about 1 ulp: the polynomial on x itself below √2 − 1 (so a tiny x keeps
/// its relative precision), log_(1 + x) above.
template <class V> inline V log1p_(V x) {
  return x < 0.41421356f ? log_reduced(x, V{}) : log_(1.0f + x);
}

/// 1/b to about 1 ulp without a divide: AVX-512 rcp14 (14 bits) and one Newton step; exact division
/// otherwise. For values that only feed losses and gradients — never for a confidence that is binned.
template <class V> inline V recip(V b) {
#ifdef __AVX512F__
  if constexpr (Lane<V>::n > 1) {
    const V r = (vf)_mm512_rcp14_ps((__m512)b);
    return r * (2.0f - b * r);
  }
#endif
  return 1.0f / b;
}

// fixed-order horizontal reductions (lane 0 first)
inline float hmax(float x) { return x; }
inline float hmax(const vf& x) { float m = x[0]; for (int i = 1; i < kLanes; ++i) m = x[i] > m ? x[i] : m; return m; }
inline float hsum(float x) { return x; }
inline float hsum(const vf& x) { float s = x[0]; for (int i = 1; i < kLanes; ++i) s += x[i]; return s; }
inline double hsum(double x) { return x; }
inline double hsum(const vd& x) { double s = x[0]; for (int i = 1; i < kLanes; ++i) s += x[i]; return s; }
inline int32_t hsum_int(const vi& x) { int32_t s = 0; for (int i = 0; i < kLanes; ++i) s += x[i]; return s; }
/// Lanes where a comparison holds: a scalar comparison gives 1, a vector one −1 per lane.
inline int64_t count_true(int32_t m) { return m != 0; }
inline int64_t count_true(const vi& m) { return -(int64_t)hsum_int(m); }

/// Equal-width bin of a float32 confidence: min(floor(c · M), M − 1) (c ≥ 0). A NaN confidence (a row with
/// non-finite logits, whose outputs are discarded) converts to INT32_MIN and is clamped to bin 0, so that
/// the index is always safe to read a table with.
template <class V> inline typename Lane<V>::I bin_of(V c, float m_float, int32_t m_bins) {
  using I = typename Lane<V>::I;
  I b = trunc_int(c * m_float);
  b = b > 0 ? b : splat_int<V>(0);
  return b < m_bins - 1 ? b : splat_int<V>(m_bins - 1);
}

}  // namespace calibkern::cpu
