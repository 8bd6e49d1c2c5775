// binned_stats: per-bin counts, Σ confidence and Σ correct (docs/math.md#ece), top-1 or classwise;
// metric_sums: the same top-1 statistics with, from the same read of each row, the proper scores' sums (NLL and
// Brier, docs/math.md#proper-scores) and, when asked, the classwise statistics. Both run row_statistics.
//
// Top-1: long rows with the online softmax of row_softmax.h, short rows (K ≤ 64) sixteen at a time across SIMD
// lanes, one read of each row. Classwise: short rows with K·M ≤ kLaneClasswiseCells bin every class in the lanes
// of that same pass; other rows with K·M ≤ kRowClasswiseCells bin their classes right after their softmax, from
// cache, into per-block partials; beyond (a vocabulary-sized K), the rows' softmax first, then their classes by
// column chunks each owned by one thread (a second read). Rows go in at most kMaxBlocks fixed blocks whose float64
// partials are reduced in block order (the column chunks add their rows in row order), so no result depends on the
// thread count. A kept row whose scaled logits hold NaN or ±inf is left out of the bins and counted (the softmax
// pass detects it, so the check costs no extra read).
#include "dispatch.h"
#include "kernels.h"
#include "row_group.h"
#include "row_softmax.h"

#include <omp.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <vector>

namespace calibkern::cpu {
namespace {

/// Per-block bin partials, reduced in block order.
struct BinPartials {
  int64_t n_bins;
  std::vector<int64_t> counts;
  std::vector<double> conf, correct;

  BinPartials(int64_t n_blocks, int64_t M)
      : n_bins(M), counts(n_blocks * M, 0), conf(n_blocks * M, 0.0), correct(n_blocks * M, 0.0) {}

  void add(int64_t block, float c, bool is_correct) {
    const int64_t k = block * n_bins + bin_of(c, (float)n_bins, (int32_t)n_bins);
    counts[k] += 1;
    conf[k] += (double)c;
    correct[k] += is_correct ? 1.0 : 0.0;
  }

  void add_sums(int64_t block, int64_t bin, int64_t n, double sum_conf, double sum_correct) {
    counts[block * n_bins + bin] += n;
    conf[block * n_bins + bin] += sum_conf;
    correct[block * n_bins + bin] += sum_correct;
  }

  void reduce_into(int64_t* out_counts, double* out_conf, double* out_correct) const {
    const int64_t n_blocks = (int64_t)counts.size() / n_bins;
    for (int64_t k = 0; k < n_bins; ++k) {
      int64_t n = 0;
      double c = 0.0, a = 0.0;
      for (int64_t b = 0; b < n_blocks; ++b) {
        n += counts[b * n_bins + k];
        c += conf[b * n_bins + k];
        a += correct[b * n_bins + k];
      }
      out_counts[k] = n;
      out_conf[k] = c;
      out_correct[k] = a;
    }
  }
};

/// Per-block Σ NLL and Σ Brier of the kept finite rows, reduced in block order.
struct ScorePartials {
  std::vector<double> nll, brier;

  explicit ScorePartials(int64_t n_blocks) : nll(n_blocks, 0.0), brier(n_blocks, 0.0) {}

  void reduce_into(double* out) const {
    double sum_nll = 0.0, sum_brier = 0.0;
    for (size_t b = 0; b < nll.size(); ++b) {
      sum_nll += nll[b];
      sum_brier += brier[b];
    }
    out[0] = sum_nll;
    out[1] = sum_brier;
  }
};

constexpr int64_t kRowBlock = 16;     // rows per block at least, long rows
constexpr int64_t kGroupBlock = 1024; // rows per block at least, short rows in lanes (a multiple of kLanes)
constexpr int64_t kLaneClasswiseCells = 1024;  // K·M up to which short rows bin their classes in the row pass
constexpr int64_t kRowClasswiseCells = 16384;  // K·M up to which long rows bin their classes as they are read
constexpr int64_t kMaxBlocks = 256;            // blocks of rows at most, whatever N
constexpr int64_t kPartialCells = 1 << 20;     // per-block partial cells kept at once at most (24 MiB)

/// Rows per block: a multiple of min_rows (the path's unit), large enough that the blocks number at most
/// kMaxBlocks and their partials of `cells` cells each stay within kPartialCells (at least one block) — so partials
/// cost O(M) memory and reduction time, not O(N·M). A function of N, the path and the cells only, never of the
/// thread count: results stay bitwise independent of it.
int64_t block_rows_for(int64_t N, int64_t min_rows, int64_t cells) {
  const int64_t max_blocks = std::clamp<int64_t>(kPartialCells / cells, 1, kMaxBlocks);
  const int64_t units = ((N + max_blocks - 1) / max_blocks + min_rows - 1) / min_rows;
  return min_rows * std::max<int64_t>(1, units);
}

/// Where the classwise statistics of a row's classes go: the [K, M] cells (count, Σ p, Σ 1[j = y] at j·M + k), and
/// optionally Σ p over bin 0 of every class in a contiguous [K] array (bin0_conf; the [K, M] count and Σ p of bin 0
/// then stay 0, the count being the rows binned less the other bins' counts): nearly every probability of a
/// vocabulary-sized row lies in bin 0, and there kLanes classes take one masked vector addition instead of kLanes
/// scattered ones.
struct ClassCells {
  int64_t* counts;
  double* conf;
  double* correct;
  double* bin0_conf = nullptr;
};

inline bool any_lane(vi mask) {
#ifdef __AVX512F__
  return _mm512_test_epi32_mask((__m512i)mask, (__m512i)mask) != 0;
#else
  return count_true(mask) != 0;
#endif
}

/// p·M below this puts c = e/s in bin 0 whatever p ≈ c: p = e·(1/s) and c are within 3·2⁻²⁴·c of each other
/// (1/s, e·(1/s) and e/s each rounded once), so c·M < kSurelyBin0·(1 + 2⁻²¹) < 1 − 2⁻²⁴ and floor(c·M) = 0.
constexpr float kSurelyBin0 = 1.0f - 1.0f / 65536.0f;

/// Bins p_j = exp(z_j − m) / s of one row's classes j ∈ [j0, j1) into cells; per cell the rows add in the order
/// of the calls. With bin0_conf, p_j = e_j · (1/s) (a multiplication, not a division): where p_j·M <
/// kSurelyBin0 the class is in bin 0; elsewhere (a few classes a row) its bin is taken from the exact c = e_j / s,
/// so every bin index is the one of c (docs/math.md's binning rule) and only the sums add p_j. `ahead`: the next
/// row to be binned (or null), whose [j0, j1) is prefetched while this one computes.
template <class T>
void bin_classes(const T* row, int64_t label, int64_t j0, int64_t j1, int64_t M, float inv_t, float m, float s,
                 const ClassCells& cells, const T* ahead = nullptr) {
  const auto add = [&](int64_t j, float p, int32_t bin) {
    if (cells.bin0_conf && bin == 0) {
      cells.bin0_conf[j] += (double)p;
      if (j == label) cells.correct[j * M] += 1.0;
      return;
    }
    const int64_t k = j * M + bin;
    cells.counts[k] += 1;
    cells.conf[k] += (double)p;
    if (j == label) cells.correct[k] += 1.0;
  };
  const float m_float = (float)M, inv_s = 1.0f / s;
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    const vf e = exp_(scaled_vector(row + j, inv_t) - m);
    if (!cells.bin0_conf) {
      const vf p = e / s;
      const vi bin = bin_of(p, m_float, (int32_t)M);
      for (int i = 0; i < kLanes; ++i) add(j + i, p[i], bin[i]);
      continue;
    }
    if (ahead) __builtin_prefetch(ahead + j);
    const vf p = e * inv_s;
    const vi in_bin0 = p * m_float < kSurelyBin0;
    vd c;
    std::memcpy(&c, cells.bin0_conf + j, sizeof(c));
    c += to_double(in_bin0 ? p : vf{});
    std::memcpy(cells.bin0_conf + j, &c, sizeof(c));
    if (label >= j && label < j + kLanes && in_bin0[label - j]) cells.correct[label * M] += 1.0;
    if (any_lane(~in_bin0))
      for (int i = 0; i < kLanes; ++i)
        if (!in_bin0[i]) add(j + i, p[i], bin_of(e[i] / s, m_float, (int32_t)M));
  }
  for (; j < j1; ++j) {
    const float e = exp_(scaled1(row + j, inv_t) - m);
    const float p = cells.bin0_conf ? e * inv_s : e / s;
    add(j, p, cells.bin0_conf && p * m_float < kSurelyBin0 ? 0 : bin_of(e / s, m_float, (int32_t)M));
  }
}

/// A finite kept row's top-1 bin into block b of partials and, with scores, its NLL = log1p(Σ_{j≠y} e_j) when
/// y = ŷ (e_y = 1), else log s − (z_y − m), and Brier = (Σ_{j≠y} e_j / s)² + Σ_{j≠y} e_j² / s² (ls holds the sums).
inline void add_top1_and_scores(BinPartials& partials, ScorePartials* scores, int64_t b, const RowSoftmax& rs,
                                const RowLabelSums& ls, int64_t label) {
  partials.add(b, 1.0f / rs.sum, rs.argmax == label);
  if (scores) {
    const double others = ls.others / ls.sum;
    scores->nll[b] += rs.argmax == label ? std::log1p(ls.others) : std::log(ls.sum) - ls.gap;
    scores->brier[b] += others * others + ls.others_sq / (ls.sum * ls.sum);
  }
}

/// One row's softmax and, given label_sums, the proper scores' sums over the row's label (row_softmax.h).
template <class T>
inline RowSoftmax scored_row_softmax(const T* row, int64_t K, float inv_t, int64_t label, RowLabelSums* label_sums) {
  return label_sums ? row_softmax<true>(row, K, inv_t, label, label_sums) : row_softmax(row, K, inv_t);
}

/// Returns the number of kept rows with non-finite values; the top-1 bins (and with scores the proper scores,
/// add_top1_and_scores) per block of block_rows rows. With class_partials, every class's statistics too (bins
/// j·M + k of the block), from the row just read (still in cache): one read of the logits.
template <class T>
int64_t top1_long_rows(const T* x, const int64_t* labels, int64_t N, int64_t K, float inv_t, int64_t ignore_index,
                       BinPartials& partials, ScorePartials* scores = nullptr, BinPartials* class_partials = nullptr,
                       int64_t block_rows = kRowBlock) {
  const int64_t n_blocks = (N + block_rows - 1) / block_rows, M = partials.n_bins;
  int64_t n_nonfinite = 0;
#pragma omp parallel for schedule(static) reduction(+ : n_nonfinite)
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (int64_t i = b * block_rows; i < std::min(N, (b + 1) * block_rows); ++i) {
      if (labels[i] == ignore_index) continue;
      RowLabelSums ls;
      const RowSoftmax rs = scored_row_softmax(x + i * K, K, inv_t, labels[i], scores ? &ls : nullptr);
      if (!rs.finite) {
        ++n_nonfinite;
        continue;
      }
      add_top1_and_scores(partials, scores, b, rs, ls, labels[i]);
      if (class_partials) {
        const int64_t at = b * K * M;
        const ClassCells cells{&class_partials->counts[at], &class_partials->conf[at], &class_partials->correct[at]};
        bin_classes(x + i * K, labels[i], 0, K, M, inv_t, rs.max, rs.sum, cells);
      }
    }
  }
  return n_nonfinite;
}

/// Per-block bin sums of short rows, kept per lane (lane i only ever adds row r0 + i), so consecutive rows
/// never wait on each other's additions; the lanes are summed in order when the block ends. Up to
/// kMaskedBins bins, every bin is updated with a lane mask; above, each lane adds to its own slot.
/// Both orders give the same sums: per (bin, lane), the rows in row order.
constexpr int64_t kMaskedBins = 32;

struct LaneBins {
  int64_t M;
  std::vector<vi> counts;
  std::vector<vf> correct;
  std::vector<vd> conf;

  explicit LaneBins(int64_t M_) : M(M_), counts(M), correct(M), conf(M) {}

  void clear() {
    std::fill(counts.begin(), counts.end(), vi{});
    std::fill(correct.begin(), correct.end(), vf{});
    std::fill(conf.begin(), conf.end(), vd{});
  }

  void add(vi bin, vi keep, vf c, vf is_correct) {
#ifdef __AVX512F__
    if (M <= kMaskedBins) {  // the same masked updates with AVX-512 mask registers, float64 halves apart
      const __mmask16 kept = _mm512_test_epi32_mask((__m512i)keep, (__m512i)keep);
      const __m512d c_lo = _mm512_cvtps_pd(_mm512_castps512_ps256((__m512)c));
      const __m512d c_hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)c), 1)));
      const __m512i one = _mm512_set1_epi32(1);
      for (int64_t k = 0; k < M; ++k) {
        const __mmask16 in = _mm512_mask_cmpeq_epi32_mask(kept, (__m512i)bin, _mm512_set1_epi32((int32_t)k));
        counts[k] = (vi)_mm512_mask_add_epi32((__m512i)counts[k], in, (__m512i)counts[k], one);
        correct[k] = (vf)_mm512_mask_add_ps((__m512)correct[k], in, (__m512)correct[k], (__m512)is_correct);
        double* sums = reinterpret_cast<double*>(&conf[k]);
        _mm512_storeu_pd(sums, _mm512_mask_add_pd(_mm512_loadu_pd(sums), (__mmask8)in, _mm512_loadu_pd(sums), c_lo));
        _mm512_storeu_pd(sums + 8, _mm512_mask_add_pd(_mm512_loadu_pd(sums + 8), (__mmask8)(in >> 8),
                                                      _mm512_loadu_pd(sums + 8), c_hi));
      }
      return;
    }
#endif
    if (M <= kMaskedBins) {
      for (int64_t k = 0; k < M; ++k) {
        const vi in = (bin == (int32_t)k) & keep;
        counts[k] -= in;  // in is −1 where the row falls in bin k
        correct[k] += in ? is_correct : vf{};
        conf[k] += to_double(in ? c : vf{});
      }
    } else {
      const vd cd = to_double(c);
      for (int i = 0; i < kLanes; ++i) {
        if (!keep[i]) continue;
        counts[bin[i]][i] += 1;
        correct[bin[i]][i] += is_correct[i];
        conf[bin[i]][i] += cd[i];
      }
    }
  }

  /// Adds the block's sums to partials' bins offset, offset + 1, …
  void flush(BinPartials& partials, int64_t block, int64_t offset = 0) const {
    for (int64_t k = 0; k < M; ++k)
      for (int i = 0; i < kLanes; ++i) partials.add_sums(block, offset + k, counts[k][i], conf[k][i], correct[k][i]);
  }
};

/// Short rows, kLanes per SIMD group (row_group.h). Returns the number of kept rows with non-finite values.
/// kScores: the NLL and Brier sums (top1_long_rows' formulas, float32 per row, float64 sums) into *scores;
/// kClasswise: every class's statistics into *class_partials (bins j·M + k), p_j = e_j / s. The top-1 bins are
/// skipped when only the classwise statistics are asked for (kClasswise without kScores).
template <bool kScores, bool kClasswise, class T>
int64_t top1_short_rows(const T* x, const int64_t* labels, int64_t N, int64_t K, float inv_t, int64_t ignore_index,
                        BinPartials& partials, ScorePartials* scores = nullptr,
                        BinPartials* class_partials = nullptr, int64_t block_rows = kGroupBlock) {
  constexpr bool kTop1 = kScores || !kClasswise;
  const int64_t n_blocks = (N + block_rows - 1) / block_rows, M = partials.n_bins;
  const float m_float = (float)M;
  int64_t n_nonfinite = 0;
#pragma omp parallel reduction(+ : n_nonfinite)
  {
    std::vector<vf> p(K), scratch(K);
    const Transpose16 transpose(K);
    LaneBins bins(M);
    std::vector<LaneBins> class_bins(kClasswise ? K : 0, LaneBins(M));
    vd nll = {}, brier = {};
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      bins.clear();
      for (LaneBins& c : class_bins) c.clear();
      nll = brier = vd{};
      for (int64_t r0 = b * block_rows; r0 < std::min(N, (b + 1) * block_rows); r0 += kLanes) {
        const RowGroup<T, vf> g(x, labels, N, K, r0, ignore_index, inv_t, scratch.data(), transpose);
        const GroupSoftmax<T, vf, kScores> sm(g, p.data(), /*probabilities=*/false);
        const vi kept = g.kept(), binned = kept & sm.finite;
        n_nonfinite += count_true(kept & ~sm.finite);
        if constexpr (kTop1)
          bins.add(bin_of(sm.conf, m_float, (int32_t)M), binned, sm.conf, sm.pred == g.label ? splat<vf>(1.0f) : vf{});
        if constexpr (kScores) {
          // log s − (z_y − m) with the gap in float64 (beyond float32's range for opposite extremes); 0 when y = ŷ
          const vf row_log = sm.pred == g.label ? log1p_(sm.others) : log_(sm.sum);
          const vf others = sm.others * sm.conf;
          const vf row_brier = others * others + sm.others_sq * (sm.conf * sm.conf);
          nll += to_double(binned ? row_log : vf{}) + (to_double(binned ? sm.z_max : vf{}) -
                                                       to_double(binned ? sm.z_label : vf{}));
          brier += to_double(binned ? row_brier : vf{});
        }
        if constexpr (kClasswise) {
          for (int64_t j = 0; j < K; ++j) {
            const vf pj = p[j] / sm.sum;
            class_bins[j].add(bin_of(pj, m_float, (int32_t)M), binned, pj,
                              g.label == (int32_t)j ? splat<vf>(1.0f) : vf{});
          }
        }
      }
      if constexpr (kTop1) bins.flush(partials, b);
      if constexpr (kScores) {
        scores->nll[b] = hsum(nll);
        scores->brier[b] = hsum(brier);
      }
      if constexpr (kClasswise)
        for (int64_t j = 0; j < K; ++j) class_bins[j].flush(*class_partials, b, j * M);
    }
  }
  return n_nonfinite;
}

/// Rows per pass of the grouped classwise statistics (their softmax read-outs are kept: 48 bytes a row).
constexpr int64_t kPassRows = 65536;

/// Classwise statistics where the blocks' [K, M] partials would not fit (K·M > kRowClasswiseCells), kPassRows rows at
/// a time in two parallel loops (two barriers, whatever K): the rows' softmax (and with top1 their top-1 bins and
/// scores, add_top1_and_scores into block 0, added by one thread in row order while the others start binning), then
/// their classes binned by column chunks, each owned by one thread, which walks the rows in order reading its
/// chunk of each (a second read of the logits, in contiguous pieces of up to 8 KiB). Σ p over bin 0 of every class
/// goes to a contiguous [K] array first (ClassCells), folded into the [K, M] outputs at the end with bin 0's counts
/// (the rows binned less the class's other bins). Per cell the rows add in row
/// order, so the chunk width may follow the thread count. Returns the number of kept non-finite rows.
template <class T>
int64_t classwise_grouped(const T* x, const int64_t* labels, int64_t N, int64_t K, int64_t M, float inv_t,
                          int64_t ignore_index, int64_t* counts, double* conf, double* correct,
                          BinPartials* top1 = nullptr, ScorePartials* scores = nullptr) {
  const int64_t G = std::min<int64_t>(std::max<int64_t>(N, 1), kPassRows);
  const int64_t chunk_width =
      std::clamp<int64_t>((K / (4 * omp_get_max_threads()) + kLanes - 1) / kLanes * kLanes, kLanes, 2048);
  const int64_t n_chunks = (K + chunk_width - 1) / chunk_width;
  std::vector<RowSoftmax> softmax(G);
  std::vector<RowLabelSums> label_sums(G);
  std::vector<char> binned(G);
  std::vector<double> bin0_conf(K, 0.0);
  const ClassCells cells{counts, conf, correct, bin0_conf.data()};
  int64_t n_nonfinite = 0, n_binned = 0;
#pragma omp parallel reduction(+ : n_nonfinite, n_binned)
  for (int64_t g0 = 0; g0 < N; g0 += G) {  // every thread walks the passes; the loops below share the work
    const int64_t g1 = std::min(N, g0 + G);
#pragma omp for schedule(static)
    for (int64_t i = g0; i < g1; ++i) {
      binned[i - g0] = 0;
      if (labels[i] == ignore_index) continue;
      softmax[i - g0] = scored_row_softmax(x + i * K, K, inv_t, labels[i], scores ? &label_sums[i - g0] : nullptr);
      binned[i - g0] = softmax[i - g0].finite;
      n_binned += softmax[i - g0].finite;
      n_nonfinite += !softmax[i - g0].finite;
    }
    if (top1) {
#pragma omp single nowait
      for (int64_t i = g0; i < g1; ++i)
        if (binned[i - g0]) add_top1_and_scores(*top1, scores, 0, softmax[i - g0], label_sums[i - g0], labels[i]);
    }
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const int64_t j0 = chunk * chunk_width, j1 = std::min(K, j0 + chunk_width);
      for (int64_t i = g0; i < g1; ++i)
        if (binned[i - g0])
          bin_classes(x + i * K, labels[i], j0, j1, M, inv_t, softmax[i - g0].max, softmax[i - g0].sum, cells,
                      i + 1 < g1 ? x + (i + 1) * K : nullptr);
    }
  }
  for (int64_t j = 0; j < K; ++j) {  // every binned row put class j in exactly one bin
    int64_t elsewhere = 0;
    for (int64_t k = 1; k < M; ++k) elsewhere += counts[j * M + k];
    counts[j * M] = n_binned - elsewhere;
    conf[j * M] = bin0_conf[j];
  }
  return n_nonfinite;
}

/// One read of each row for everything binned_stats and metric_sums return (the classwise paths look at a row
/// again while it is in cache): the top-1 bins into counts, conf, correct [M] (null: not wanted), the proper-score
/// sums into scores [2] (null: not wanted) and the classwise statistics into cw_* [K, M] (null: not wanted).
/// Short rows go in SIMD lanes, classes too while K·M ≤ kLaneClasswiseCells; long rows (or short ones with more
/// classwise cells) one at a time, binning their classes into per-block partials while K·M ≤
/// kRowClasswiseCells; beyond, the grouped pass. Returns the number of kept non-finite rows.
template <class T>
int64_t row_statistics(const T* x, const int64_t* y, int64_t N, int64_t K, int64_t M, float inv_t,
                       int64_t ignore_index, double* scores, int64_t* counts, double* conf, double* correct,
                       int64_t* cw_counts, double* cw_conf, double* cw_correct) {
  const bool classwise = cw_counts != nullptr, short_rows = K <= kGroupK;
  const bool lane_classes = classwise && short_rows && K * M <= kLaneClasswiseCells;
  const bool row_classes = classwise && !lane_classes && K * M <= kRowClasswiseCells;
  const bool grouped = classwise && !lane_classes && !row_classes;
  const int64_t block_rows = grouped ? std::max<int64_t>(N, 1)  // one block, its rows added in row order
                             : block_rows_for(N, short_rows && !row_classes ? kGroupBlock : kRowBlock,
                                              lane_classes || row_classes ? K * M + M : M);
  const int64_t n_blocks = (N + block_rows - 1) / block_rows;
  BinPartials partials(n_blocks, M), class_partials(lane_classes || row_classes ? n_blocks : 0, K * M);
  ScorePartials score_partials(n_blocks);
  ScorePartials* sp = scores ? &score_partials : nullptr;
  int64_t n_nonfinite;
  if (grouped)
    n_nonfinite = classwise_grouped(x, y, N, K, M, inv_t, ignore_index, cw_counts, cw_conf, cw_correct, &partials, sp);
  else if (lane_classes)
    n_nonfinite = scores ? top1_short_rows<true, true>(x, y, N, K, inv_t, ignore_index, partials, sp, &class_partials,
                                                       block_rows)
                         : top1_short_rows<false, true>(x, y, N, K, inv_t, ignore_index, partials, nullptr,
                                                        &class_partials, block_rows);
  else if (short_rows && !row_classes)
    n_nonfinite = scores ? top1_short_rows<true, false>(x, y, N, K, inv_t, ignore_index, partials, sp, nullptr,
                                                        block_rows)
                         : top1_short_rows<false, false>(x, y, N, K, inv_t, ignore_index, partials, nullptr, nullptr,
                                                         block_rows);
  else
    n_nonfinite = top1_long_rows(x, y, N, K, inv_t, ignore_index, partials, sp,
                                 row_classes ? &class_partials : nullptr, block_rows);
  if (counts) partials.reduce_into(counts, conf, correct);
  if (scores) score_partials.reduce_into(scores);
  if (lane_classes || row_classes) class_partials.reduce_into(cw_counts, cw_conf, cw_correct);
  return n_nonfinite;
}

/// Tensors around row_statistics: metric_sums' eight outputs; without scores the score sums stay 0, and in
/// classwise mode without scores the top-1 bins are not taken (binned_stats' classwise mode).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> statistics(
    const at::Tensor& logits, const at::Tensor& labels, int64_t n_bins, double temperature, int64_t ignore_index,
    bool with_scores, bool classwise_mode) {
  const int64_t N = logits.size(0), K = logits.size(1), M = n_bins;
  const float inv_t = (float)(1.0 / temperature);
  const auto f64 = logits.options().dtype(at::kDouble);
  const auto i64 = logits.options().dtype(at::kLong);
  at::Tensor counts = at::zeros({M}, i64), conf = at::zeros({M}, f64), correct = at::zeros({M}, f64);
  at::Tensor scores = at::zeros({2}, f64);
  const std::vector<int64_t> class_shape{classwise_mode ? K : 0, M};
  at::Tensor cw_counts = at::zeros(class_shape, i64), cw_conf = at::zeros(class_shape, f64),
             cw_correct = at::zeros(class_shape, f64);
  const bool top1 = with_scores || !classwise_mode;
  int64_t n_nonfinite = 0;
  with_float_type(logits, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    n_nonfinite = row_statistics(
        static_cast<const T*>(logits.const_data_ptr()), labels.data_ptr<int64_t>(), N, K, M, inv_t, ignore_index,
        with_scores ? scores.data_ptr<double>() : nullptr, top1 ? counts.data_ptr<int64_t>() : nullptr,
        conf.data_ptr<double>(), correct.data_ptr<double>(),
        classwise_mode ? cw_counts.data_ptr<int64_t>() : nullptr, cw_conf.data_ptr<double>(),
        cw_correct.data_ptr<double>());
  });
  return {counts, conf, correct, at::scalar_tensor(n_nonfinite, i64), scores, cw_counts, cw_conf, cw_correct};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> binned_stats(
    const at::Tensor& logits, const at::Tensor& labels, int64_t n_bins, double temperature, int64_t ignore_index,
    bool classwise_mode) {
  auto [counts, conf, correct, n_nonfinite, scores, cw_counts, cw_conf, cw_correct] =
      statistics(logits, labels, n_bins, temperature, ignore_index, /*scores=*/false, classwise_mode);
  if (classwise_mode) return {cw_counts, cw_conf, cw_correct, n_nonfinite};
  return {counts, conf, correct, n_nonfinite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> metric_sums(
    const at::Tensor& logits, const at::Tensor& labels, int64_t n_bins, double temperature, int64_t ignore_index,
    bool classwise_mode) {
  return statistics(logits, labels, n_bins, temperature, ignore_index, /*scores=*/true, classwise_mode);
}

}  // namespace calibkern::cpu
