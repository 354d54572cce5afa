// CPU tile rasterizer for 3D Gaussian splatting: tile binning, front-to-back
// compositing and its hand-written backward, parallel over tiles.
// Conventions follow gsplat 1.5.3 (classic mode) so both backends agree:
// pixel centres at (j + 0.5, i + 0.5), alpha = min(0.999, o * exp(-sigma)),
// contributions below 1/255 skipped, a pixel stops before the Gaussian that
// would bring its transmittance to 1e-4 or below.
//
// Each pixel is done in two passes: a walk over the Gaussians reaching its
// row decides the contributors and their weights (sigma, exp and alpha in
// whole vectors per chunk, then a scalar pass for the transmittance), then
// the channel work runs over that list in 32-byte vector registers (the
// caller pads feature rows to a multiple of kPad channels) on a copy of the
// tile's feature rows, contiguous and in cache. The forward keeps which
// Gaussians each pixel composited (one bit per tile Gaussian) for the
// backward, which recomputes only theirs, bit for bit, instead of walking
// again.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.999;
constexpr double kTransmittanceMin = 1e-4;
// A Gaussian's screen bounds reach at most this many standard deviations per axis.
constexpr double kMaxExtend = 3.33;
// Tile Gaussians are screened against a pixel this many at a time: one bit each in a 64-bit mask.
constexpr int64_t kChunk = 64;
// Feature rows hold a multiple of this many channels (zero padded by the caller): whole 32-byte vectors for float.
constexpr int64_t kPad = 8;
// Channel vectors the channel loops keep in registers at once (half of AVX2's 16).
constexpr int kMaxBlocks = 8;
// exp(-sigma) is evaluated on sigma clamped to [0, kSigmaMax]: past it o * exp(-sigma) < 1/255 for any o <= 1, so
// the clamp changes no decision.
constexpr double kSigmaMax = 20;

// 32 bytes of T: 8 floats or 4 doubles. GCC vector extensions: plain values the compiler keeps in registers.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  static type splat(T x) { return type{} + x; }
  // lanes summed pairwise (halves first): three adds instead of a chain of lanes - 1
  static T sum(type v) {
#if defined(__AVX__)
    if constexpr (lanes == 8) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    } else {
      const __m128d h = _mm_add_pd(_mm256_castpd256_pd128((__m256d)v), _mm256_extractf128_pd((__m256d)v, 1));
      return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    }
#else
    T s = 0;
    for (int64_t l = 0; l < lanes; ++l) s += v[l];
    return s;
#endif
  }
  // a * b + c rounded once where the CPU has FMA: explicit, since -ffp-contract=off keeps the compiler from fusing,
  // so every use rounds alike (the forward's and the backward's screening stay bitwise equal).
  static type fmadd(type a, type b, type c) {
#if defined(__FMA__)
    if constexpr (lanes == 8)
      return (type)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
    else
      return (type)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
    return a * b + c;
#endif
  }
};

// Range reduction and Taylor degree of exp per type: the truncation error is below half an ulp.
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
  using Int = int32_t;
  static constexpr int degree = 7, mantissa = 23, bias = 127;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;  // ln2_hi * n exact for |n| < 2^14
};
template <>
struct ExpTraits<double> {
  using Int = int64_t;
  static constexpr int degree = 13, mantissa = 52, bias = 1023;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
};

// 1 / k! for k = 0..Degree, rounded to T.
template <typename T, int Degree>
struct Taylor {
  T c[Degree + 1];
  constexpr Taylor() : c() {
    double f = 1;
    for (int k = 0; k <= Degree; ++k) {
      f *= k > 1 ? k : 1;
      c[k] = static_cast<T>(1 / f);
    }
  }
};

// exp(-s) lane by lane for s in [0, kSigmaMax]: -s = n ln2 + r with |r| <= ln2 / 2, a Taylor polynomial in r,
// times 2^n written into the exponent bits. Vectorised, unlike std::exp, and within an ulp or two of it.
template <typename T>
typename Vec<T>::type exp_neg(typename Vec<T>::type s) {
  using V = Vec<T>;
  using E = ExpTraits<T>;
  using I = typename E::Int;
  typedef I itype __attribute__((vector_size(32)));
  static constexpr Taylor<T, E::degree> taylor{};
  const typename V::type x = -s;
  // round to nearest: the argument is positive, so truncation is floor
  const itype n = __builtin_convertvector(x * T(M_LOG2E) + T(64.5), itype) - I(64);
  const typename V::type nf = __builtin_convertvector(n, typename V::type);
  const typename V::type r = (x - nf * E::ln2_hi) - nf * E::ln2_lo;
  typename V::type p = V::splat(taylor.c[E::degree]);
  for (int k = E::degree - 1; k >= 0; --k) p = V::fmadd(p, r, V::splat(taylor.c[k]));
  const itype bits = (n + I(E::bias)) << E::mantissa;
  typename V::type scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Bit l set where lane l of a vector comparison (lanes all ones or all zeros) is true.
template <typename M>
uint32_t lane_bits(M mask) {
  constexpr int lanes = sizeof(M) / sizeof(mask[0]);
#if defined(__AVX__)
  if constexpr (lanes == 8)
    return static_cast<uint32_t>(_mm256_movemask_ps((__m256)mask));
  else
    return static_cast<uint32_t>(_mm256_movemask_pd((__m256d)mask));
#else
  uint32_t bits = 0;
  for (int l = 0; l < lanes; ++l) bits |= static_cast<uint32_t>(mask[l] & 1) << l;
  return bits;
#endif
}

// Calls body(std::integral_constant<int, NB>) with NB = blocks (1 <= blocks <= kMaxBlocks): channel loops get their
// vector count at compile time, so their accumulators stay in registers.
template <int NB = kMaxBlocks, typename F>
void with_blocks(int64_t blocks, const F& body) {
  if constexpr (NB > 1) {
    if (blocks < NB) return with_blocks<NB - 1>(blocks, body);
  }
  body(std::integral_constant<int, NB>{});
}

// out[c] = sum over q of w[q] * features[local[q] * D + c], c in [0, D): contributors inside, up to kMaxBlocks
// channel vectors outside, summed in registers (independent add chains, one pass over the list per block group).
template <typename T>
void weighted_sum(const T* features, int64_t D, const int32_t* local, const T* w, int64_t n, T* out) {
  using V = Vec<T>;
  for (int64_t c0 = 0; c0 < D; c0 += kMaxBlocks * V::lanes) {
    with_blocks(std::min<int64_t>(kMaxBlocks, (D - c0) / V::lanes), [&](auto blocks) {
      constexpr int NB = decltype(blocks)::value;
      typename V::type acc[NB] = {};
      for (int64_t q = 0; q < n; ++q) {
        const typename V::type wq = V::splat(w[q]);
        const T* f = features + local[q] * D + c0;
        for (int b = 0; b < NB; ++b) acc[b] = V::fmadd(V::load(f + b * V::lanes), wq, acc[b]);
      }
      for (int b = 0; b < NB; ++b) V::store(out + c0 + b * V::lanes, acc[b]);
    });
  }
}

// The channel part of one pixel's backward: grad[local[q] * D + c] += w[q] * v[c] and dot[q] = f_q . v for every
// contributor q, v (d loss / d render of the pixel, D channels) held in registers per group of channel vectors.
template <typename T>
void feature_gradients(const T* features, T* grad, int64_t D, const int32_t* local, const T* w, int64_t n,
                       const T* v, T* dot) {
  using V = Vec<T>;
  std::fill(dot, dot + n, T(0));
  for (int64_t c0 = 0; c0 < D; c0 += kMaxBlocks * V::lanes) {
    with_blocks(std::min<int64_t>(kMaxBlocks, (D - c0) / V::lanes), [&](auto blocks) {
      constexpr int NB = decltype(blocks)::value;
      typename V::type vb[NB];
      for (int b = 0; b < NB; ++b) vb[b] = V::load(v + c0 + b * V::lanes);
      for (int64_t q = 0; q < n; ++q) {
        const typename V::type wq = V::splat(w[q]);
        const T* f = features + local[q] * D + c0;
        T* g = grad + local[q] * D + c0;
        typename V::type s{};
        for (int b = 0; b < NB; ++b) {
          V::store(g + b * V::lanes, V::fmadd(wq, vb[b], V::load(g + b * V::lanes)));
          s = V::fmadd(V::load(f + b * V::lanes), vb[b], s);
        }
        dot[q] += V::sum(s);
      }
    });
  }
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// Runs body(task, worker) for every task in [0, n) on `workers` slots, slot w taking tasks w, w + workers, ...
// (interleaved, so costly neighbouring tiles spread over slots). The assignment is static: each slot sums into its
// own gradient buffer in a fixed order, so the backward is bitwise reproducible for a given thread count (a shared
// task counter made it depend on scheduling). The slots run on torch's own intra-op threads: separate threads would
// compete with torch's OpenMP workers, which spin for a while after every torch op.
template <typename F>
void parallel_tasks(int64_t n, int workers, const F& body) {
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      for (int64_t t = w; t < n; t += workers) body(t, static_cast<int>(w));
  });
}

// Tiles per image, for a [B, tiles_h, tiles_w] grid flattened into one index.
struct Grid {
  int64_t width, height, tile_size, tiles_w, tiles_h;
  int64_t tiles() const { return tiles_w * tiles_h; }
};

// One pixel's contributors front to back, as the walk found them: position in the tile's list, alpha,
// exp(-sigma), the transmittance in front of each and its weight alpha * transmittance; `dot` is the backward's
// f . v scratch.
template <typename T>
struct Contributors {
  std::vector<int32_t> local;
  std::vector<T> alpha, vis, trans, weight, dot;
  std::vector<T> inv;  // backward: 1 / (1 - alpha)
  int64_t n = 0;
  T t_final = 1;  // transmittance behind the last one

  // padded by a chunk: screen() writes alpha and vis of reloaded contributors in whole vectors
  void reserve(int64_t capacity) {
    if (static_cast<int64_t>(local.size()) >= capacity + kChunk) return;
    local.resize(capacity + kChunk);
    for (auto* v : {&alpha, &vis, &trans, &weight, &dot, &inv}) v->resize(capacity + kChunk);
  }

  // The contributor mask of words 64-bit words (bit k: tile Gaussian k composited). `local` is increasing (the walk
  // goes front to back through the tile's depth order), so each word is assembled in a register and stored once.
  void write_mask(uint64_t* mask, int64_t words) const {
    std::fill(mask, mask + words, uint64_t(0));
    uint64_t word = 0;
    int64_t at = 0;
    for (int64_t q = 0; q < n; ++q) {
      if ((local[q] >> 6) != at) {
        mask[at] = word;
        word = 0;
        at = local[q] >> 6;
      }
      word |= uint64_t(1) << (local[q] & 63);
    }
    if (n > 0) mask[at] = word;
  }
};

// What screening needs of one Gaussian-camera pair, in one record: a tile gather reads one cache line for it instead
// of three scattered arrays, and the cut-offs are computed once per pair rather than once per tile.
template <typename T>
struct ScreenGaussian {
  T x, y, ca, cb, cc, op;
  T cut;    // sigma <= cut exactly when o * exp(-sigma) >= 1/255
  T row_k;  // min over x of sigma at row offset dy is row_k * dy^2, row_k = 0.5 det(conic) / a
};

// Records of all E pairs from means2d [E, 2], conics [E, 3], opacities [E].
template <typename T>
std::vector<ScreenGaussian<T>> screen_gaussians(const T* means2d, const T* conics, const T* opacities, int64_t E) {
  std::vector<ScreenGaussian<T>> out(E);
  at::parallel_for(0, E, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const T a = conics[3 * g], b = conics[3 * g + 1], c = conics[3 * g + 2];
      out[g] = {means2d[2 * g], means2d[2 * g + 1], a, b, c, opacities[g], std::log(opacities[g] / T(kAlphaMin)),
                T(0.5) * (a * c - b * b) / a};
    }
  });
  return out;
}

// Gaussians of one tile gathered contiguously in depth order (structure of arrays, with their feature rows), and
// the subset of them reaching the current pixel row (`row_*`, same order), so each pixel screens only Gaussians
// that can touch its row.
template <typename T>
struct TileGaussians {
  int64_t n = 0, D = 0;
  std::vector<T> x, y, ca, cb, cc, op, cut, row_k;  // as in ScreenGaussian; y, cut, row_k padded to whole vectors
  std::vector<int64_t> id;
  std::vector<T> features;  // [n, D]
  // the row list: padded by kChunk entries so that screening reads whole vectors
  std::vector<T> row_x, row_y, row_ca, row_cb, row_cc, row_op;
  std::vector<int32_t> row_local;
  int64_t n_row = 0;
  Contributors<T> list;
  std::vector<T> grad_f;  // backward: feature gradients of the tile's Gaussians, [n, D], flushed once per tile
  std::vector<T> grad_g;  // backward: (means2d, conics, opacity, |means2d| per pixel) gradients, [n, 8]
  // the walk's screen() output for one chunk: exp(-sigma) and alpha of each
  alignas(32) T vis[kChunk];
  alignas(32) T alpha[kChunk];

  void gather(const ScreenGaussian<T>* pairs, const T* feat, int64_t channels, const int64_t* ids, int64_t start,
              int64_t end) {
    n = end - start;
    D = channels;
    for (auto* v : {&x, &ca, &cb, &cc, &op}) v->resize(n);
    for (auto* v : {&y, &cut, &row_k}) v->resize(n + Vec<T>::lanes);
    for (auto* v : {&row_x, &row_y, &row_ca, &row_cb, &row_cc, &row_op}) v->resize(n + kChunk);
    id.resize(n);
    row_local.resize(n + kChunk);
    features.resize(n * D);
    list.reserve(n);
    constexpr int64_t ahead = 16;  // prefetch distance: the ids are scattered over the whole scene
    for (int64_t k = 0; k < n; ++k) {
      if (k + ahead < n) {
        const int64_t next = ids[start + k + ahead];
        for (int64_t c = 0; c < D; c += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(feat + next * D + c);
        __builtin_prefetch(pairs + next);
      }
      const int64_t g = ids[start + k];
      const ScreenGaussian<T>& p = pairs[g];
      id[k] = g;
      x[k] = p.x;
      y[k] = p.y;
      ca[k] = p.ca;
      cb[k] = p.cb;
      cc[k] = p.cc;
      op[k] = p.op;
      cut[k] = p.cut;
      row_k[k] = p.row_k;
      std::memcpy(&features[k * D], feat + g * D, D * sizeof(T));
    }
  }

  // Row list entry m := tile Gaussian k (the parameters screen() and the backward read).
  void copy_to_row(int64_t m, int64_t k) {
    row_x[m] = x[k];
    row_y[m] = y[k];
    row_ca[m] = ca[k];
    row_cb[m] = cb[k];
    row_cc[m] = cc[k];
    row_op[m] = op[k];
  }

  // Compacts into the row list the tile Gaussians whose footprint reaches pixel row py. A small margin keeps
  // rounding from dropping a Gaussian the exact per-pixel test would accept.
  void select_row(T py) {
    using V = Vec<T>;
    int64_t m = 0;
    for (int64_t k0 = 0; k0 < n; k0 += V::lanes) {
      const typename V::type dy = V::load(&y[k0]) - py;
      uint32_t bits = lane_bits(V::load(&row_k[k0]) * dy * dy <= V::load(&cut[k0]) * T(1.001) + T(1e-3));
      if (n - k0 < V::lanes) bits &= (1u << (n - k0)) - 1;
      for (; bits; bits &= bits - 1, ++m) {
        const int64_t k = k0 + __builtin_ctz(bits);
        copy_to_row(m, k);
        row_local[m] = static_cast<int32_t>(k);
      }
    }
    n_row = m;
  }

  // exp(-sigma) and alpha of row Gaussians [k0, k0 + len) (len <= kChunk) at pixel (px, py) into vis_out and
  // alpha_out, in whole vectors (the row arrays and the outputs are padded); returns the mask of those that contribute (sigma >= 0,
  // alpha >= 1/255), bit j for Gaussian k0 + j, none past len. Branch-free.
  uint64_t screen(T px, T py, int64_t k0, int64_t len, T* vis_out, T* alpha_out) {
    using V = Vec<T>;
    using VT = typename V::type;
    const T *gx = row_x.data() + k0, *gy = row_y.data() + k0, *a = row_ca.data() + k0, *b = row_cb.data() + k0,
            *c = row_cc.data() + k0, *o = row_op.data() + k0;
    uint64_t bits = 0;
    for (int64_t j = 0; j < len; j += V::lanes) {
      const VT dx = V::load(gx + j) - px, dy = V::load(gy + j) - py;
      const VT s = V::fmadd(V::load(b + j) * dx, dy, T(0.5) * V::fmadd(V::load(a + j) * dx, dx, V::load(c + j) * dy * dy));
      const VT clamped = s < T(0) ? V::splat(0) : (s > T(kSigmaMax) ? V::splat(T(kSigmaMax)) : s);
      const VT e = exp_neg<T>(clamped);
      const VT raw = V::load(o + j) * e;
      const VT al = raw > T(kAlphaMax) ? V::splat(T(kAlphaMax)) : raw;
      V::store(vis_out + j, e);
      V::store(alpha_out + j, al);
      bits |= static_cast<uint64_t>(lane_bits((s >= T(0)) & (al >= T(kAlphaMin)))) << j;
    }
    return len < kChunk ? bits & ((uint64_t(1) << len) - 1) : bits;
  }

  // The front-to-back walk of pixel (px, py) over the current row list: the contributors' tile positions and
  // weights into `list` (what the forward composites).
  void walk(T px, T py) {
    Contributors<T>& out = list;
    T t = 1;
    int64_t m = 0;
    bool done = false;
    for (int64_t k0 = 0; k0 < n_row && !done; k0 += kChunk) {
      for (uint64_t bits = screen(px, py, k0, std::min(n_row - k0, kChunk), vis, alpha); bits; bits &= bits - 1) {
        const int j = __builtin_ctzll(bits);
        const T a = alpha[j];
        const T next = t * (1 - a);
        if (next <= T(kTransmittanceMin)) {
          done = true;
          break;
        }
        out.local[m] = row_local[k0 + j];
        out.weight[m] = a * t;
        ++m;
        t = next;
      }
    }
    out.n = m;
    out.t_final = t;
  }

  // `list` for pixel (px, py) from its contributor mask (bit k set: tile Gaussian k composited, words of 64
  // bits), with the row list holding exactly those Gaussians in order (the backward reads their parameters
  // there): exp(-sigma) and alpha by screen() and the transmittance chained as walk() chains it, so bitwise what
  // walk() found.
  void reload(const uint64_t* mask, int64_t words, T px, T py) {
    Contributors<T>& out = list;
    int64_t m = 0;
    for (int64_t w = 0; w < words; ++w)
      for (uint64_t bits = mask[w]; bits; bits &= bits - 1, ++m) {
        const int32_t k = static_cast<int32_t>(64 * w + __builtin_ctzll(bits));
        out.local[m] = k;
        copy_to_row(m, k);
      }
    n_row = m;
    for (int64_t q0 = 0; q0 < m; q0 += kChunk)
      screen(px, py, q0, std::min(m - q0, kChunk), out.vis.data() + q0, out.alpha.data() + q0);
    T t = 1;
    for (int64_t q = 0; q < m; ++q) {
      const T a = out.alpha[q];
      out.trans[q] = t;
      out.weight[q] = a * t;
      t = t * (1 - a);
    }
    // whole vectors of divisions here, instead of one scalar division per contributor in the backward's loop
    using V = Vec<T>;
    for (int64_t q = 0; q < m; q += V::lanes)
      V::store(out.inv.data() + q, T(1) / (T(1) - V::load(out.alpha.data() + q)));
    out.n = m;
    out.t_final = t;
  }
};

// Where each tile's contributor masks start in the flat mask buffer (one entry per tile, plus the total): a tile
// of n Gaussians holds tile_size^2 pixel masks of ceil(n / 64) words, pixel (i, j) of the tile at (i * tile_size
// + j) * words. 32 bytes per tile-Gaussian pair, whatever the number of channels.
std::vector<int64_t> mask_starts(const int64_t* off, int64_t n_tiles, int64_t tile_size) {
  std::vector<int64_t> start(n_tiles + 1, 0);
  for (int64_t t = 0; t < n_tiles; ++t)
    start[t + 1] = start[t] + tile_size * tile_size * ((off[t + 1] - off[t] + 63) / 64);
  return start;
}

// Rectangle of tiles [x0, x1) x [y0, y1) touched by a Gaussian's screen bounds.
template <typename T>
void tile_rect(T mx, T my, int32_t rx, int32_t ry, const Grid& g, int64_t r[4]) {
  const T ts = static_cast<T>(g.tile_size);
  auto clampi = [](int64_t v, int64_t hi) { return std::min<int64_t>(std::max<int64_t>(v, 0), hi); };
  r[0] = clampi(static_cast<int64_t>(std::floor((mx - rx) / ts)), g.tiles_w);
  r[1] = clampi(static_cast<int64_t>(std::ceil((mx + rx) / ts)), g.tiles_w);
  r[2] = clampi(static_cast<int64_t>(std::floor((my - ry) / ts)), g.tiles_h);
  r[3] = clampi(static_cast<int64_t>(std::ceil((my + ry) / ts)), g.tiles_h);
}

// A Gaussian's sort key in a tile: depth, then id.
template <typename T>
struct DepthKey {
  T depth;
  int64_t id;
  static DepthKey make(T depth, int64_t id) { return {depth, id}; }
  int64_t index() const { return id; }
  bool operator<(const DepthKey& o) const { return depth < o.depth || (depth == o.depth && id < o.id); }
};

// For float (training) one integer: the depth's bits mapped to an order-preserving unsigned integer above a 32-bit
// id; integer compares sort several times faster than the pair.
template <>
struct DepthKey<float> {
  uint64_t key;
  static DepthKey make(float depth, int64_t id) {
    uint32_t u;
    std::memcpy(&u, &depth, sizeof(u));
    u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;  // negatives reversed below positives
    return {(static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(id)};
  }
  int64_t index() const { return static_cast<int64_t>(key & 0xFFFFFFFFu); }
  bool operator<(const DepthKey& o) const { return key < o.key; }
};

template <typename T>
std::vector<at::Tensor> bin_impl(const at::Tensor& means2d, const at::Tensor& radii,
                                 const at::Tensor& depths, const Grid& grid) {
  const int64_t B = means2d.size(0), N = means2d.size(1);
  const T* m = means2d.data_ptr<T>();
  const int32_t* rad = radii.data_ptr<int32_t>();
  const T* dep = depths.data_ptr<T>();
  const int64_t n_tiles = B * grid.tiles();

  std::vector<int64_t> rects(4 * B * N, 0);
  auto offsets = torch::zeros({n_tiles + 1}, torch::kInt64);
  int64_t* counts = offsets.data_ptr<int64_t>();
  for (int64_t e = 0; e < B * N; ++e) {
    if (rad[2 * e] <= 0 || rad[2 * e + 1] <= 0) continue;
    int64_t* r = &rects[4 * e];
    tile_rect<T>(m[2 * e], m[2 * e + 1], rad[2 * e], rad[2 * e + 1], grid, r);
    const int64_t base = (e / N) * grid.tiles();
    for (int64_t ty = r[2]; ty < r[3]; ++ty)
      for (int64_t tx = r[0]; tx < r[1]; ++tx) ++counts[base + ty * grid.tiles_w + tx + 1];
  }
  std::partial_sum(counts, counts + n_tiles + 1, counts);

  // (depth, id) pairs sorted per tile: the same (tile, depth, id) order as gsplat's radix sort, without the
  // indirect loads and buffer allocations of a stable sort of ids by depth.
  std::vector<DepthKey<T>> keys(counts[n_tiles]);
  std::vector<int64_t> cursor(counts, counts + n_tiles);
  for (int64_t e = 0; e < B * N; ++e) {
    const int64_t* r = &rects[4 * e];
    const int64_t base = (e / N) * grid.tiles();
    for (int64_t ty = r[2]; ty < r[3]; ++ty)
      for (int64_t tx = r[0]; tx < r[1]; ++tx)
        keys[cursor[base + ty * grid.tiles_w + tx]++] = DepthKey<T>::make(dep[e], e);
  }
  auto flat_ids = torch::empty({counts[n_tiles]}, torch::kInt64);
  int64_t* out = flat_ids.data_ptr<int64_t>();
  parallel_tasks(n_tiles, num_threads(), [&](int64_t t, int) {
    std::sort(keys.begin() + counts[t], keys.begin() + counts[t + 1]);
    for (int64_t i = counts[t]; i < counts[t + 1]; ++i) out[i] = keys[i].index();
  });
  return {offsets, flat_ids};
}

template <typename T>
void forward_impl(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& opacities,
                  const at::Tensor& features, const at::Tensor& offsets, const at::Tensor& flat_ids,
                  const Grid& grid, at::Tensor& head, at::Tensor& tail, at::Tensor& alpha, uint64_t* masks) {
  const int64_t D = features.size(2);
  const int64_t split = head.size(3), used = split + tail.size(3);
  const T* m = means2d.data_ptr<T>();
  const T* con = conics.data_ptr<T>();
  const T* opa = opacities.data_ptr<T>();
  const T* feat = features.data_ptr<T>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ids = flat_ids.data_ptr<int64_t>();
  T* out_head = head.data_ptr<T>();
  T* out_tail = tail.data_ptr<T>();
  T* out_alpha = alpha.data_ptr<T>();
  const int64_t n_tiles = head.size(0) * grid.tiles();
  const int64_t HW = grid.width * grid.height;

  const int workers = num_threads();
  const std::vector<ScreenGaussian<T>> pairs = screen_gaussians(m, con, opa, means2d.size(0) * means2d.size(1));
  std::vector<TileGaussians<T>> scratch(workers);
  std::vector<std::vector<T>> pixel(workers, std::vector<T>(D));
  const std::vector<int64_t> mask_start = masks ? mask_starts(off, n_tiles, grid.tile_size) : std::vector<int64_t>();
  parallel_tasks(n_tiles, workers, [&](int64_t t, int worker) {
    TileGaussians<T>& tg = scratch[worker];
    const Contributors<T>& list = tg.list;
    T* acc = pixel[worker].data();
    const int64_t b = t / grid.tiles(), tt = t % grid.tiles();
    const int64_t i0 = (tt / grid.tiles_w) * grid.tile_size, j0 = (tt % grid.tiles_w) * grid.tile_size;
    tg.gather(pairs.data(), feat, D, ids, off[t], off[t + 1]);
    const int64_t words = (tg.n + 63) / 64;
    for (int64_t i = i0; i < std::min(i0 + grid.tile_size, grid.height); ++i) {
      tg.select_row(i + T(0.5));
      for (int64_t j = j0; j < std::min(j0 + grid.tile_size, grid.width); ++j) {
        tg.walk(j + T(0.5), i + T(0.5));
        weighted_sum(tg.features.data(), D, list.local.data(), list.weight.data(), list.n, acc);
        const int64_t pix = b * HW + i * grid.width + j;
        std::copy(acc, acc + split, out_head + pix * split);
        std::copy(acc + split, acc + used, out_tail + pix * (used - split));
        out_alpha[pix] = 1 - list.t_final;
        if (masks) list.write_mask(masks + mask_start[t] + ((i - i0) * grid.tile_size + j - j0) * words, words);
      }
    }
  });
}

// Per pixel the forward's contributors are reloaded, then visited are visited back to front with the running sum of
// what lies behind. Gradients are summed into one buffer per thread (no atomics), reduced after the loop into
// the outputs: v_means2d [B, N, 2], v_conics [B, N, 3], v_opacities [B, N], v_features [B, N, D] and the per-pixel
// absolute means2d gradients summed, v_abs [B, N, 2].
template <typename T>
void backward_impl(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& opacities,
                   const at::Tensor& features, const at::Tensor& offsets, const at::Tensor& flat_ids,
                   const uint64_t* masks, const at::Tensor& v_head, const at::Tensor& v_tail,
                   const at::Tensor& v_alpha, const Grid& grid, at::Tensor& v_means2d, at::Tensor& v_conics,
                   at::Tensor& v_opacities, at::Tensor& v_features, at::Tensor& v_abs) {
  const int64_t B = features.size(0), N = features.size(1), D = features.size(2);
  const int64_t E = B * N;
  const T* m = means2d.data_ptr<T>();
  const T* con = conics.data_ptr<T>();
  const T* opa = opacities.data_ptr<T>();
  const T* feat = features.data_ptr<T>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ids = flat_ids.data_ptr<int64_t>();
  const T* vh = v_head.data_ptr<T>();
  const T* vt = v_tail.data_ptr<T>();
  const int64_t split = v_head.size(3), rest = v_tail.size(3);
  const T* va = v_alpha.data_ptr<T>();
  const int64_t n_tiles = B * grid.tiles();
  const int64_t HW = grid.width * grid.height;
  const int threads = num_threads();
  // per thread [E, D + 8]: the feature gradients, then the tile's 8 geometric ones in grad_g's order; zeroed by
  // the threads themselves
  const int64_t row = D + 8;
  std::unique_ptr<T[]> sums(new T[threads * E * row]);  // uninitialised: zeroed in parallel below
  T* per_thread = sums.get();
  at::parallel_for(0, threads * E, 4096, [&](int64_t begin, int64_t end) {
    std::fill(per_thread + begin * row, per_thread + end * row, T(0));
  });
  const std::vector<int64_t> mask_start = mask_starts(off, n_tiles, grid.tile_size);
  const std::vector<ScreenGaussian<T>> pairs = screen_gaussians(m, con, opa, E);
  std::vector<TileGaussians<T>> scratch(threads);
  std::vector<std::vector<T>> pixel(threads, std::vector<T>(D, T(0)));
  parallel_tasks(n_tiles, threads, [&](int64_t t, int worker) {
    TileGaussians<T>& tg = scratch[worker];
    Contributors<T>& list = tg.list;
    T* vout = pixel[worker].data();  // d loss / d render of this pixel, all D channels (padding stays 0)
    const int64_t b = t / grid.tiles(), tt = t % grid.tiles();
    const int64_t i0 = (tt / grid.tiles_w) * grid.tile_size, j0 = (tt % grid.tiles_w) * grid.tile_size;
    const int64_t start = off[t], end = off[t + 1];
    if (end == start) return;
    tg.gather(pairs.data(), feat, D, ids, start, end);
    // Per-tile gradients: written in cache, flushed once
    tg.grad_f.assign(tg.n * D, T(0));
    tg.grad_g.assign(tg.n * 8, T(0));
    const int64_t words = (tg.n + 63) / 64;
    for (int64_t i = i0; i < std::min(i0 + grid.tile_size, grid.height); ++i) {
      for (int64_t j = j0; j < std::min(j0 + grid.tile_size, grid.width); ++j) {
        const int64_t pix = b * HW + i * grid.width + j;
        const T px = j + T(0.5), py = i + T(0.5);
        tg.reload(masks + mask_start[t] + ((i - i0) * grid.tile_size + j - j0) * words, words, px, py);
        const int64_t n = list.n;
        if (n == 0) continue;
        std::copy(vh + pix * split, vh + (pix + 1) * split, vout);
        std::copy(vt + pix * rest, vt + (pix + 1) * rest, vout + split);
        feature_gradients(tg.features.data(), tg.grad_f.data(), D, list.local.data(), list.weight.data(), n, vout,
                          list.dot.data());
        const T t_final = list.t_final, va_out = va[pix];
        T behind = 0;  // sum over the contributors behind the current one of w_i * (f_i . v_render)
        for (int64_t q = n - 1; q >= 0; --q) {
          const T a = list.alpha[q], vis = list.vis[q], trans = list.trans[q], dot = list.dot[q];
          const T raw = tg.row_op[q] * vis;
          const T inv = list.inv[q];
          // d render / d alpha_k = f_k T_k - (contributions behind k) / (1 - alpha_k)
          const T v_a = va_out * t_final * inv + dot * trans - behind * inv;
          behind += a * trans * dot;
          if (raw > T(kAlphaMax)) continue;  // clamped: no gradient to o or sigma
          const T dx = tg.row_x[q] - px, dy = tg.row_y[q] - py;
          const T ca = tg.row_ca[q], cb = tg.row_cb[q], cc = tg.row_cc[q];
          const T v_sigma = -raw * v_a;
          const T v_mx = (ca * dx + cb * dy) * v_sigma;
          const T v_my = (cb * dx + cc * dy) * v_sigma;
          T* vg = tg.grad_g.data() + list.local[q] * 8;
          vg[0] += v_mx;
          vg[1] += v_my;
          vg[2] += T(0.5) * dx * dx * v_sigma;
          vg[3] += dx * dy * v_sigma;
          vg[4] += T(0.5) * dy * dy * v_sigma;
          vg[5] += vis * v_a;
          vg[6] += std::abs(v_mx);  // AbsGS densification statistic (gsplat's absgrad)
          vg[7] += std::abs(v_my);
        }
      }
    }
    // Gaussians span several tiles handled by any worker: each worker sums into its own buffer.
    T* mine = per_thread + worker * E * row;
    for (int64_t k = 0; k < tg.n; ++k) {
      T* dst = mine + tg.id[k] * row;
      const T* src_f = tg.grad_f.data() + k * D;
      const T* src_g = tg.grad_g.data() + k * 8;
      for (int64_t c = 0; c < D; ++c) dst[c] += src_f[c];
      for (int64_t c = 0; c < 8; ++c) dst[D + c] += src_g[c];
    }
  });
  T* out_m = v_means2d.data_ptr<T>();
  T* out_c = v_conics.data_ptr<T>();
  T* out_o = v_opacities.data_ptr<T>();
  T* out_f = v_features.data_ptr<T>();
  T* out_abs = v_abs.data_ptr<T>();
  at::parallel_for(0, E, 1024, [&](int64_t begin, int64_t end) {
    std::vector<T> total(row);
    for (int64_t g = begin; g < end; ++g) {
      std::copy(per_thread + g * row, per_thread + (g + 1) * row, total.begin());
      for (int w = 1; w < threads; ++w)
        for (int64_t c = 0; c < row; ++c) total[c] += per_thread[(w * E + g) * row + c];
      std::copy(total.begin(), total.begin() + D, out_f + g * D);
      const T* geo = total.data() + D;  // (means2d, conics, opacity, |means2d|)
      out_m[2 * g] = geo[0];
      out_m[2 * g + 1] = geo[1];
      for (int64_t c = 0; c < 3; ++c) out_c[3 * g + c] = geo[2 + c];
      out_o[g] = geo[5];
      out_abs[2 * g] = geo[6];
      out_abs[2 * g + 1] = geo[7];
    }
  });
}

// ---- EWA projection of 3D Gaussians, forward and backward (gsplat 1.5.3's pinhole projection, classic mode) ----

// One camera: world-to-camera rotation R (row major) and translation t, pinhole intrinsics, and the bounds of the
// normalised coordinates the Jacobian is evaluated at (1.3x the field of view: stabler far off-screen).
template <typename T>
struct PinholeCamera {
  T R[9], t[3], fx, fy, cx, cy, lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;

  PinholeCamera(const T* viewmat, const T* K, int64_t width, int64_t height) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) R[3 * i + j] = viewmat[4 * i + j];
      t[i] = viewmat[4 * i + 3];
    }
    fx = K[0], fy = K[4], cx = K[2], cy = K[5];
    lim_x_pos = (width - cx) / fx + T(0.15) * width / fx;
    lim_x_neg = cx / fx + T(0.15) * width / fx;
    lim_y_pos = (height - cy) / fy + T(0.15) * height / fy;
    lim_y_neg = cy / fy + T(0.15) * height / fy;
  }
};

// One Gaussian's shape: normalised quaternion (w, x, y, z), its rotation matrix and the scales. A non-finite or
// degenerate Gaussian (zero quaternion or scale) is replaced by a unit one at the origin and flagged invalid (culled,
// no gradient), so no NaN reaches the outputs.
template <typename T>
struct GaussianShape {
  T mean[3], q[4], inv_norm, s[3], rot[9];
  bool valid;

  GaussianShape(const T* means, const T* quats, const T* scales, T opacity, int64_t n) {
    const T *m = means + 3 * n, *qu = quats + 4 * n, *sc = scales + 3 * n;
    T check = opacity * 0, q_max = 0, s_max = 0;  // x * 0 is NaN exactly where x is inf or NaN
    for (int k = 0; k < 3; ++k) check += m[k] * 0 + sc[k] * 0, s_max = std::max(s_max, std::abs(sc[k]));
    for (int k = 0; k < 4; ++k) check += qu[k] * 0, q_max = std::max(q_max, std::abs(qu[k]));
    valid = check == 0 && q_max > 0 && s_max > 0;
    const T unit_q[4] = {1, 0, 0, 0}, unit_s[3] = {1, 1, 1}, origin[3] = {0, 0, 0};
    std::copy(valid ? m : origin, (valid ? m : origin) + 3, mean);
    std::copy(valid ? sc : unit_s, (valid ? sc : unit_s) + 3, s);
    const T* q_in = valid ? qu : unit_q;
    const T norm = std::sqrt(q_in[0] * q_in[0] + q_in[1] * q_in[1] + q_in[2] * q_in[2] + q_in[3] * q_in[3]);
    inv_norm = 1 / std::max(norm, T(1e-12));
    for (int k = 0; k < 4; ++k) q[k] = q_in[k] * inv_norm;
    const T w = q[0], x = q[1], y = q[2], z = q[3];
    const T r[9] = {1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                    2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                    2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)};
    std::copy(r, r + 9, rot);
  }
};

// The projection of one Gaussian into one camera, with the intermediates its backward needs.
template <typename T>
struct ProjectedPair {
  T p[3];      // mean in the camera frame
  T inv_z;     // 1 / z (1 when out of the depth range, kept finite)
  T ux, uy;    // normalised coordinates clamped to the camera's bounds
  bool inside_x, inside_y;  // the clamp left them unchanged (the gradient passes)
  T M[9];      // R rot diag(s): the camera-frame covariance is M M^T
  T j0[3], j1[3];  // rows of J M, J the projection's Jacobian
  T c00, c01, c11, det;  // 2D covariance (with eps2d) and its determinant
  bool in_front;  // within the depth range with a positive-definite 2D covariance

  ProjectedPair(const PinholeCamera<T>& cam, const GaussianShape<T>& g, T near_plane, T far_plane, T eps2d) {
    for (int i = 0; i < 3; ++i) {
      p[i] = cam.t[i];
      for (int k = 0; k < 3; ++k) p[i] += cam.R[3 * i + k] * g.mean[k];
      for (int j = 0; j < 3; ++j) {
        T sum = 0;
        for (int k = 0; k < 3; ++k) sum += cam.R[3 * i + k] * g.rot[3 * k + j];
        M[3 * i + j] = sum * g.s[j];
      }
    }
    in_front = g.valid && p[2] >= near_plane && p[2] <= far_plane;
    inv_z = in_front ? 1 / p[2] : T(1);
    const T xn = p[0] * inv_z, yn = p[1] * inv_z;
    ux = std::min(std::max(xn, -cam.lim_x_neg), cam.lim_x_pos);
    uy = std::min(std::max(yn, -cam.lim_y_neg), cam.lim_y_pos);
    inside_x = -cam.lim_x_neg < xn && xn < cam.lim_x_pos;
    inside_y = -cam.lim_y_neg < yn && yn < cam.lim_y_pos;
    const T a0 = cam.fx * inv_z, a1 = cam.fy * inv_z;
    for (int k = 0; k < 3; ++k) {
      j0[k] = a0 * (M[k] - ux * M[6 + k]);
      j1[k] = a1 * (M[3 + k] - uy * M[6 + k]);
    }
    c00 = j0[0] * j0[0] + j0[1] * j0[1] + j0[2] * j0[2] + eps2d;
    c01 = j0[0] * j1[0] + j0[1] * j1[1] + j0[2] * j1[2];
    c11 = j1[0] * j1[0] + j1[1] * j1[1] + j1[2] * j1[2] + eps2d;
    det = c00 * c11 - c01 * c01;
    in_front = in_front && det > 0;
    if (!in_front) det = 1;
  }
};

// Gradients of one Gaussian summed over the cameras: mean, scales, and the rotation matrix (turned into the
// quaternion's once, as it is linear).
template <typename T>
struct ShapeGradient {
  T mean[3] = {}, s[3] = {}, rot[9] = {};

  // Adds the chain rule of ProjectedPair for d loss / d (means2d, conics, depth) = v_m2 [2], v_con [3], v_z.
  void add(const PinholeCamera<T>& cam, const GaussianShape<T>& g, const ProjectedPair<T>& pp, const T* v_m2,
           const T* v_con, T v_z) {
    const T inv = 1 / pp.det;
    const T con0 = pp.c11 * inv, con1 = -pp.c01 * inv, con2 = pp.c00 * inv;
    const T v_det = -inv * (con0 * v_con[0] + con1 * v_con[1] + con2 * v_con[2]);
    const T v_c00 = inv * v_con[2] + v_det * pp.c11;
    const T v_c11 = inv * v_con[0] + v_det * pp.c00;
    const T v_c01 = -inv * v_con[1] - 2 * v_det * pp.c01;
    const T a0 = cam.fx * pp.inv_z, a1 = cam.fy * pp.inv_z;
    T v_M[9], v_a0 = 0, v_a1 = 0, v_ux = 0, v_uy = 0;
    for (int k = 0; k < 3; ++k) {
      const T v_j0 = 2 * v_c00 * pp.j0[k] + v_c01 * pp.j1[k];
      const T v_j1 = 2 * v_c11 * pp.j1[k] + v_c01 * pp.j0[k];
      const T M2 = pp.M[6 + k];
      v_M[k] = a0 * v_j0;
      v_M[3 + k] = a1 * v_j1;
      v_M[6 + k] = -a0 * pp.ux * v_j0 - a1 * pp.uy * v_j1;
      v_a0 += v_j0 * (pp.M[k] - pp.ux * M2);
      v_a1 += v_j1 * (pp.M[3 + k] - pp.uy * M2);
      v_ux -= a0 * v_j0 * M2;
      v_uy -= a1 * v_j1 * M2;
    }
    // means2d = (fx x / z + cx, fy y / z + cy)
    const T v_xn = cam.fx * v_m2[0] + (pp.inside_x ? v_ux : T(0));
    const T v_yn = cam.fy * v_m2[1] + (pp.inside_y ? v_uy : T(0));
    const T v_inv_z = cam.fx * v_a0 + cam.fy * v_a1 + v_xn * pp.p[0] + v_yn * pp.p[1];
    const T v_p[3] = {v_xn * pp.inv_z, v_yn * pp.inv_z, v_z - v_inv_z * pp.inv_z * pp.inv_z};
    for (int k = 0; k < 3; ++k) {
      for (int i = 0; i < 3; ++i) mean[k] += cam.R[3 * i + k] * v_p[i];
      for (int j = 0; j < 3; ++j) {  // M = R m, m = rot diag(s)
        T v_m = 0;
        for (int i = 0; i < 3; ++i) v_m += cam.R[3 * i + k] * v_M[3 * i + j];
        s[j] += v_m * g.rot[3 * k + j];
        rot[3 * k + j] += v_m * g.s[j];
      }
    }
  }

  // d loss / d quaternion (unnormalised) from the rotation matrix's gradient.
  void quaternion(const GaussianShape<T>& g, T* out) const {
    const T w = g.q[0], x = g.q[1], y = g.q[2], z = g.q[3];
    const T* v = rot;
    const T vq[4] = {
        2 * (-z * v[1] + y * v[2] + z * v[3] - x * v[5] - y * v[6] + x * v[7]),
        2 * (y * v[1] + z * v[2] + y * v[3] - 2 * x * v[4] - w * v[5] + z * v[6] + w * v[7] - 2 * x * v[8]),
        2 * (-2 * y * v[0] + x * v[1] + w * v[2] + x * v[3] + z * v[5] - w * v[6] + z * v[7] - 2 * y * v[8]),
        2 * (-2 * z * v[0] - w * v[1] + x * v[2] + w * v[3] - 2 * z * v[4] + y * v[5] + x * v[6] + y * v[7])};
    const T along = vq[0] * w + vq[1] * x + vq[2] * y + vq[3] * z;  // q / |q| has no gradient along q
    for (int k = 0; k < 4; ++k) out[k] = (vq[k] - g.q[k] * along) * g.inv_norm;
  }
};

// Screen bounds of a projected pair: 3.33 sigma per axis, tightened to where opacity * exp(-sigma) falls below
// 1/255; zero when culled (out of depth, invisible, off-screen).
template <typename T>
void screen_radii(const ProjectedPair<T>& pp, T opacity, T mx, T my, int64_t width, int64_t height, int32_t* radii) {
  radii[0] = radii[1] = 0;
  if (!pp.in_front || !(opacity >= T(kAlphaMin))) return;
  const T extend = std::min(std::sqrt(2 * std::log(opacity / T(kAlphaMin))), T(kMaxExtend));
  const T rx = std::ceil(extend * std::sqrt(std::max(pp.c00, T(0))));
  const T ry = std::ceil(extend * std::sqrt(std::max(pp.c11, T(0))));
  const bool on_screen = mx + rx > 0 && mx - rx < width && my + ry > 0 && my - ry < height;
  if (!on_screen || (rx <= 0 && ry <= 0)) return;
  radii[0] = static_cast<int32_t>(rx);
  radii[1] = static_cast<int32_t>(ry);
}

struct ProjectionSettings {
  int64_t width, height;
  double near_plane, far_plane, eps2d;
};

template <typename T>
void project_forward_impl(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                          const at::Tensor& opacities, const at::Tensor& viewmats, const at::Tensor& Ks,
                          const ProjectionSettings& set, at::Tensor& means2d, at::Tensor& conics, at::Tensor& depths,
                          at::Tensor& radii) {
  const int64_t B = viewmats.size(0), N = means.size(0);
  const T *mu = means.data_ptr<T>(), *qu = quats.data_ptr<T>(), *sc = scales.data_ptr<T>();
  const T* op = opacities.data_ptr<T>();
  std::vector<PinholeCamera<T>> cams;
  for (int64_t b = 0; b < B; ++b)
    cams.emplace_back(viewmats.data_ptr<T>() + 16 * b, Ks.data_ptr<T>() + 9 * b, set.width, set.height);
  T *out_m = means2d.data_ptr<T>(), *out_c = conics.data_ptr<T>(), *out_z = depths.data_ptr<T>();
  int32_t* out_r = radii.data_ptr<int32_t>();
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const GaussianShape<T> g(mu, qu, sc, op[n], n);
      for (int64_t b = 0; b < B; ++b) {
        const PinholeCamera<T>& cam = cams[b];
        const ProjectedPair<T> pp(cam, g, T(set.near_plane), T(set.far_plane), T(set.eps2d));
        const int64_t e = b * N + n;
        const T inv = 1 / pp.det;
        out_c[3 * e] = pp.c11 * inv;
        out_c[3 * e + 1] = -pp.c01 * inv;
        out_c[3 * e + 2] = pp.c00 * inv;
        out_m[2 * e] = cam.fx * (pp.p[0] * pp.inv_z) + cam.cx;
        out_m[2 * e + 1] = cam.fy * (pp.p[1] * pp.inv_z) + cam.cy;
        out_z[e] = pp.p[2];
        screen_radii(pp, g.valid ? op[n] : T(0), out_m[2 * e], out_m[2 * e + 1], set.width, set.height,
                     out_r + 2 * e);
      }
    }
  });
}

template <typename T>
void project_backward_impl(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                           const at::Tensor& opacities, const at::Tensor& viewmats, const at::Tensor& Ks,
                           const at::Tensor& radii, const ProjectionSettings& set, const at::Tensor& v_means2d,
                           const at::Tensor& v_conics, const at::Tensor& v_depths, at::Tensor& v_means,
                           at::Tensor& v_quats, at::Tensor& v_scales) {
  const int64_t B = viewmats.size(0), N = means.size(0);
  const T *mu = means.data_ptr<T>(), *qu = quats.data_ptr<T>(), *sc = scales.data_ptr<T>();
  const T* op = opacities.data_ptr<T>();
  const int32_t* rad = radii.data_ptr<int32_t>();
  const T *vm = v_means2d.data_ptr<T>(), *vc = v_conics.data_ptr<T>(), *vz = v_depths.data_ptr<T>();
  std::vector<PinholeCamera<T>> cams;
  for (int64_t b = 0; b < B; ++b)
    cams.emplace_back(viewmats.data_ptr<T>() + 16 * b, Ks.data_ptr<T>() + 9 * b, set.width, set.height);
  T *out_mu = v_means.data_ptr<T>(), *out_q = v_quats.data_ptr<T>(), *out_s = v_scales.data_ptr<T>();
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const GaussianShape<T> g(mu, qu, sc, op[n], n);
      ShapeGradient<T> grad;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t e = b * N + n;
        if (rad[2 * e] <= 0 && rad[2 * e + 1] <= 0) continue;  // culled: no gradient, as in gsplat
        const ProjectedPair<T> pp(cams[b], g, T(set.near_plane), T(set.far_plane), T(set.eps2d));
        grad.add(cams[b], g, pp, vm + 2 * e, vc + 3 * e, vz[e]);
      }
      std::copy(grad.mean, grad.mean + 3, out_mu + 3 * n);
      std::copy(grad.s, grad.s + 3, out_s + 3 * n);
      grad.quaternion(g, out_q + 4 * n);
    }
  });
}

Grid make_grid(int64_t width, int64_t height, int64_t tile_size) {
  return {width, height, tile_size, (width + tile_size - 1) / tile_size,
          (height + tile_size - 1) / tile_size};
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

void check_padded(const at::Tensor& features) {
  TORCH_CHECK(features.size(2) % kPad == 0, "features must hold a multiple of ", kPad,
              " channels (zero padded), got ", features.size(2));
}

}  // namespace

// means [N, 3], quats [N, 4] (w, x, y, z), scales [N, 3], opacities [N], viewmats [B, 4, 4], Ks [B, 3, 3] ->
// (means2d [B, N, 2], conics [B, N, 3], depths [B, N], radii [B, N, 2] int32, zero where culled).
std::vector<at::Tensor> project_forward(at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor opacities,
                                        at::Tensor viewmats, at::Tensor Ks, int64_t width, int64_t height,
                                        double near_plane, double far_plane, double eps2d) {
  for (auto& [t, n] : {std::pair{means, "means"}, {quats, "quats"}, {scales, "scales"}, {opacities, "opacities"},
                       {viewmats, "viewmats"}, {Ks, "Ks"}})
    check_cpu_contiguous(t, n);
  const int64_t B = viewmats.size(0), N = means.size(0);
  auto opts = means.options();
  auto means2d = torch::empty({B, N, 2}, opts), conics = torch::empty({B, N, 3}, opts);
  auto depths = torch::empty({B, N}, opts), radii = torch::empty({B, N, 2}, opts.dtype(torch::kInt32));
  const ProjectionSettings set{width, height, near_plane, far_plane, eps2d};
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_forward", [&] {
    project_forward_impl<scalar_t>(means, quats, scales, opacities, viewmats, Ks, set, means2d, conics, depths, radii);
  });
  return {means2d, conics, depths, radii};
}

// The inputs of project_forward, its radii and d loss / d (means2d, conics, depths) -> gradients w.r.t. means
// [N, 3], quats [N, 4] and scales [N, 3], summed over the cameras (none from culled pairs).
std::vector<at::Tensor> project_backward(at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor opacities,
                                         at::Tensor viewmats, at::Tensor Ks, at::Tensor radii, at::Tensor v_means2d,
                                         at::Tensor v_conics, at::Tensor v_depths, int64_t width, int64_t height,
                                         double near_plane, double far_plane, double eps2d) {
  for (auto& [t, n] : {std::pair{means, "means"}, {quats, "quats"}, {scales, "scales"}, {opacities, "opacities"},
                       {viewmats, "viewmats"}, {Ks, "Ks"}, {radii, "radii"}, {v_means2d, "v_means2d"},
                       {v_conics, "v_conics"}, {v_depths, "v_depths"}})
    check_cpu_contiguous(t, n);
  auto v_means = torch::empty_like(means), v_quats = torch::empty_like(quats), v_scales = torch::empty_like(scales);
  const ProjectionSettings set{width, height, near_plane, far_plane, eps2d};
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_backward", [&] {
    project_backward_impl<scalar_t>(means, quats, scales, opacities, viewmats, Ks, radii, set, v_means2d, v_conics,
                                    v_depths, v_means, v_quats, v_scales);
  });
  return {v_means, v_quats, v_scales};
}

// means2d [B, N, 2], radii [B, N, 2] int32, depths [B, N] ->
// (offsets [B * tiles_h * tiles_w + 1] int64, flat_ids [n_isects] int64 into B * N).
std::vector<at::Tensor> bin_gaussians(at::Tensor means2d, at::Tensor radii, at::Tensor depths,
                                      int64_t width, int64_t height, int64_t tile_size) {
  for (auto& [t, n] : {std::pair{means2d, "means2d"}, {radii, "radii"}, {depths, "depths"}})
    check_cpu_contiguous(t, n);
  TORCH_CHECK(radii.scalar_type() == torch::kInt32, "radii must be int32");
  TORCH_CHECK(means2d.size(0) * means2d.size(1) < (int64_t(1) << 32), "at most 2^32 Gaussian-camera pairs");
  const Grid grid = make_grid(width, height, tile_size);
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "bin_gaussians", [&] {
    result = bin_impl<scalar_t>(means2d, radii, depths, grid);
  });
  return result;
}

// features [B, N, D] (D a multiple of 8, zero padded) are rendered into two images, channels [0, split) and
// [split, used) (e.g. colors and depth), so callers need no slicing: -> (head [B, H, W, split],
// tail [B, H, W, used - split], alpha [B, H, W]), with keep_masks followed by the pixels' contributor masks that
// rasterize_backward takes (int64, 32 bytes per tile-Gaussian pair).
std::vector<at::Tensor> rasterize_forward(at::Tensor means2d, at::Tensor conics, at::Tensor opacities,
                                          at::Tensor features, at::Tensor offsets, at::Tensor flat_ids,
                                          int64_t split, int64_t used, int64_t width, int64_t height,
                                          int64_t tile_size, bool keep_masks) {
  for (auto& [t, n] : {std::pair{means2d, "means2d"}, {conics, "conics"}, {opacities, "opacities"},
                       {features, "features"}, {offsets, "offsets"}, {flat_ids, "flat_ids"}})
    check_cpu_contiguous(t, n);
  check_padded(features);
  const Grid grid = make_grid(width, height, tile_size);
  const int64_t B = features.size(0), D = features.size(2);
  TORCH_CHECK(0 <= split && split <= used && used <= D, "need 0 <= split <= used <= D");
  auto head = torch::empty({B, height, width, split}, features.options());
  auto tail = torch::empty({B, height, width, used - split}, features.options());
  auto alpha = torch::empty({B, height, width}, features.options());
  at::Tensor masks;
  if (keep_masks)
    masks = torch::empty({mask_starts(offsets.data_ptr<int64_t>(), B * grid.tiles(), tile_size).back()}, torch::kInt64);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "rasterize_forward", [&] {
    forward_impl<scalar_t>(means2d, conics, opacities, features, offsets, flat_ids, grid, head, tail, alpha,
                           keep_masks ? reinterpret_cast<uint64_t*>(masks.data_ptr<int64_t>()) : nullptr);
  });
  if (!keep_masks) return {head, tail, alpha};
  return {head, tail, alpha, masks};
}

// -> gradients w.r.t. (means2d [B, N, 2], conics [B, N, 3], opacities [B, N], features [B, N, D]) and the
// per-pixel absolute means2d gradients summed [B, N, 2] (gsplat's absgrad).
std::vector<at::Tensor> rasterize_backward(at::Tensor means2d, at::Tensor conics, at::Tensor opacities,
                                           at::Tensor features, at::Tensor offsets, at::Tensor flat_ids,
                                           at::Tensor masks, at::Tensor v_head, at::Tensor v_tail, at::Tensor v_alpha,
                                           int64_t width, int64_t height, int64_t tile_size) {
  for (auto& [t, n] : {std::pair{v_head, "v_head"}, {v_tail, "v_tail"}, {v_alpha, "v_alpha"},
                       {features, "features"}, {means2d, "means2d"}, {conics, "conics"}, {opacities, "opacities"},
                       {masks, "masks"}})
    check_cpu_contiguous(t, n);
  check_padded(features);
  const Grid grid = make_grid(width, height, tile_size);
  const int64_t B = features.size(0), N = features.size(1), D = features.size(2);
  TORCH_CHECK(v_head.size(3) + v_tail.size(3) <= D, "more rendered channels than features");
  TORCH_CHECK(masks.scalar_type() == torch::kInt64 &&
                  masks.numel() == mask_starts(offsets.data_ptr<int64_t>(), B * grid.tiles(), tile_size).back(),
              "contributor masks do not match the tiles: pass those of rasterize_forward(..., keep_masks=True)");
  auto opts = features.options();
  auto v_means2d = torch::empty({B, N, 2}, opts), v_abs = torch::empty({B, N, 2}, opts);
  auto v_conics = torch::empty({B, N, 3}, opts), v_opacities = torch::empty({B, N}, opts);
  auto v_features = torch::empty({B, N, D}, opts);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "rasterize_backward", [&] {
    const auto* mask_words = reinterpret_cast<const uint64_t*>(masks.data_ptr<int64_t>());
    backward_impl<scalar_t>(means2d, conics, opacities, features, offsets, flat_ids, mask_words, v_head, v_tail,
                            v_alpha, grid, v_means2d, v_conics, v_opacities, v_features, v_abs);
  });
  return {v_means2d, v_conics, v_opacities, v_features, v_abs};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_forward", &project_forward, "EWA projection of 3D Gaussians into pinhole cameras");
  m.def("project_backward", &project_backward, "Backward of project_forward");
  m.def("bin_gaussians", &bin_gaussians, "Tile binning with per-tile depth sort");
  m.def("rasterize_forward", &rasterize_forward, "Front-to-back tile compositing");
  m.def("rasterize_backward", &rasterize_backward, "Backward of rasterize_forward");
}
