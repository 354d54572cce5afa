// CPU tile rasterizer for 3D Gaussian splatting: tile binning, front-to-back
// compositing and its hand-written backward, parallel over tiles.
// Conventions follow gsplat 1.5.3 (classic mode) so both backends agree:
// pixel centres at (j + 0.5, i + 0.5), alpha = min(0.999, o * exp(-sigma)),
// contributions below 1/255 skipped, a pixel stops before the Gaussian that
// would bring its transmittance to 1e-4 or below.
//
// Each pixel is done in two passes: a scalar walk over the Gaussians reaching
// its row decides the contributors and their weights (forward and backward
// run the same walk, so they take exactly the same decisions), then the
// channel work runs over that list in 32-byte vector registers (the caller
// pads feature rows to a multiple of kPad channels).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.999;
constexpr double kTransmittanceMin = 1e-4;
// Tile Gaussians are screened against a pixel this many at a time.
constexpr int64_t kChunk = 64;
// Feature rows hold a multiple of this many channels (zero padded by the caller): whole 32-byte vectors for float.
constexpr int64_t kPad = 8;

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
  static T sum(type v) {
    T s = 0;
    for (int64_t l = 0; l < lanes; ++l) s += v[l];
    return s;
  }
};

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

// Screen-space Gaussians as a structure of arrays.
template <typename T>
struct GaussianSoA {
  std::vector<T> x, y, ca, cb, cc, op;
  std::vector<T> cut;    // alpha < 1/255 exactly when sigma > log(255 o): skips exp() for far pixels
  std::vector<T> row_k;  // min over x of sigma at row offset dy is row_k * dy^2, row_k = 0.5 det(conic) / a
  std::vector<int64_t> id;
  std::vector<int32_t> local;  // position in the tile's list

  void resize(int64_t n) {
    for (auto* v : {&x, &y, &ca, &cb, &cc, &op, &cut, &row_k}) v->resize(n);
    id.resize(n);
    local.resize(n);
  }
};

// One pixel's contributors front to back, as the walk found them: row-list index, alpha, exp(-sigma) and the
// transmittance in front of each; then the channel passes' per-contributor scratch (weight alpha * trans, feature
// row, f . v in the backward).
template <typename T>
struct Contributors {
  std::vector<int32_t> k;
  std::vector<T> alpha, vis, trans, weight, dot;
  std::vector<const T*> feature;
  int64_t n = 0;
  T t_final = 1;  // transmittance behind the last one

  void reserve(int64_t capacity) {
    if (static_cast<int64_t>(k.size()) >= capacity) return;
    k.resize(capacity);
    feature.resize(capacity);
    for (auto* v : {&alpha, &vis, &trans, &weight, &dot}) v->resize(capacity);
  }
};

// Gaussians of one tile gathered contiguously (`tile`), and the subset of them reaching the current pixel
// row (`row`, same depth order), so each pixel screens only Gaussians that can touch its row.
template <typename T>
struct TileGaussians {
  GaussianSoA<T> tile, row;
  int64_t n_row = 0;
  Contributors<T> list;
  std::vector<T> grad_f;  // backward: feature gradients of the tile's Gaussians, [n, D], flushed once per tile
  std::vector<T> grad_g;  // backward: (means2d, conics, opacity, |means2d| per pixel) gradients, [n, 8]
  T sig[kChunk];        // screen() output: sigma of each Gaussian of the chunk
  int32_t idx[kChunk];  // screen() output: row-list offsets of the Gaussians that reach the pixel

  void gather(const T* means2d, const T* conics, const T* opacities, const int64_t* ids, int64_t start,
              int64_t end) {
    const int64_t n = end - start;
    tile.resize(n);
    row.resize(n);
    list.reserve(n);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t g = ids[start + k];
      const T a = conics[3 * g], b = conics[3 * g + 1], c = conics[3 * g + 2];
      tile.id[k] = g;
      tile.local[k] = static_cast<int32_t>(k);
      tile.x[k] = means2d[2 * g];
      tile.y[k] = means2d[2 * g + 1];
      tile.ca[k] = a;
      tile.cb[k] = b;
      tile.cc[k] = c;
      tile.op[k] = opacities[g];
      tile.cut[k] = std::log(opacities[g] / T(kAlphaMin));
      tile.row_k[k] = T(0.5) * (a * c - b * b) / a;
    }
  }

  // Compacts into `row` the tile Gaussians whose footprint reaches pixel row py. A small margin keeps
  // rounding from dropping a Gaussian the exact per-pixel test would accept.
  void select_row(T py) {
    const int64_t n = static_cast<int64_t>(tile.id.size());
    int64_t m = 0;
    for (int64_t k = 0; k < n; ++k) {
      const T dy = tile.y[k] - py;
      row.x[m] = tile.x[k];
      row.y[m] = tile.y[k];
      row.ca[m] = tile.ca[k];
      row.cb[m] = tile.cb[k];
      row.cc[m] = tile.cc[k];
      row.op[m] = tile.op[k];
      row.cut[m] = tile.cut[k];
      row.id[m] = tile.id[k];
      row.local[m] = tile.local[k];
      m += tile.row_k[k] * dy * dy <= tile.cut[k] * T(1.001) + T(1e-3);
    }
    n_row = m;
  }

  // Screens row Gaussians [k0, k1) (k1 - k0 <= kChunk) against pixel (px, py): writes sigma of each to
  // sig and the offsets of those with 0 <= sigma <= cut (alpha can reach 1/255) to idx, returns their
  // count. Both loops are branch-free so they vectorise.
  int64_t screen(T px, T py, int64_t k0, int64_t k1) {
    const int64_t n = k1 - k0;
    const T *gx = row.x.data() + k0, *gy = row.y.data() + k0, *a = row.ca.data() + k0,
            *b = row.cb.data() + k0, *c = row.cc.data() + k0, *lim = row.cut.data() + k0;
    for (int64_t j = 0; j < n; ++j) {
      const T dx = gx[j] - px, dy = gy[j] - py;
      sig[j] = T(0.5) * (a[j] * dx * dx + c[j] * dy * dy) + b[j] * dx * dy;
    }
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      idx[m] = static_cast<int32_t>(j);
      m += (sig[j] >= 0) & (sig[j] <= lim[j]);
    }
    return m;
  }

  // The front-to-back walk of pixel (px, py) over the current row list, into `list`. Forward and backward both
  // call it, so they agree on every contributor.
  void walk(T px, T py) {
    Contributors<T>& out = list;
    const int64_t n = n_row;
    T t = 1;
    int64_t m = 0;
    bool done = false;
    for (int64_t k0 = 0; k0 < n && !done; k0 += kChunk) {
      const int64_t m_pass = screen(px, py, k0, std::min(n, k0 + kChunk));
      for (int64_t q = 0; q < m_pass; ++q) {
        const int64_t k = k0 + idx[q];
        const T vis = std::exp(-sig[idx[q]]);
        const T a = std::min(T(kAlphaMax), row.op[k] * vis);
        if (a < T(kAlphaMin)) continue;
        const T next = t * (1 - a);
        if (next <= T(kTransmittanceMin)) {
          done = true;
          break;
        }
        out.k[m] = static_cast<int32_t>(k);
        out.alpha[m] = a;
        out.vis[m] = vis;
        out.trans[m] = t;
        ++m;
        t = next;
      }
    }
    out.n = m;
    out.t_final = t;
  }
};

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
  struct Key {
    T depth;
    int64_t id;
    bool operator<(const Key& o) const { return depth < o.depth || (depth == o.depth && id < o.id); }
  };
  std::vector<Key> keys(counts[n_tiles]);
  std::vector<int64_t> cursor(counts, counts + n_tiles);
  for (int64_t e = 0; e < B * N; ++e) {
    const int64_t* r = &rects[4 * e];
    const int64_t base = (e / N) * grid.tiles();
    for (int64_t ty = r[2]; ty < r[3]; ++ty)
      for (int64_t tx = r[0]; tx < r[1]; ++tx) keys[cursor[base + ty * grid.tiles_w + tx]++] = {dep[e], e};
  }
  auto flat_ids = torch::empty({counts[n_tiles]}, torch::kInt64);
  int64_t* out = flat_ids.data_ptr<int64_t>();
  parallel_tasks(n_tiles, num_threads(), [&](int64_t t, int) {
    std::sort(keys.begin() + counts[t], keys.begin() + counts[t + 1]);
    for (int64_t i = counts[t]; i < counts[t + 1]; ++i) out[i] = keys[i].id;
  });
  return {offsets, flat_ids};
}

template <typename T>
void forward_impl(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& opacities,
                  const at::Tensor& features, const at::Tensor& offsets, const at::Tensor& flat_ids,
                  const Grid& grid, at::Tensor& head, at::Tensor& tail, at::Tensor& alpha) {
  using V = Vec<T>;
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
  std::vector<TileGaussians<T>> scratch(workers);
  std::vector<std::vector<T>> pixel(workers, std::vector<T>(D));
  parallel_tasks(n_tiles, workers, [&](int64_t t, int worker) {
    TileGaussians<T>& tg = scratch[worker];
    Contributors<T>& list = tg.list;
    T* acc = pixel[worker].data();
    const int64_t b = t / grid.tiles(), tt = t % grid.tiles();
    const int64_t i0 = (tt / grid.tiles_w) * grid.tile_size, j0 = (tt % grid.tiles_w) * grid.tile_size;
    const int64_t start = off[t], end = off[t + 1];
    tg.gather(m, con, opa, ids, start, end);
    const T** f = list.feature.data();
    T* w = list.weight.data();
    for (int64_t i = i0; i < std::min(i0 + grid.tile_size, grid.height); ++i) {
      tg.select_row(i + T(0.5));
      for (int64_t j = j0; j < std::min(j0 + grid.tile_size, grid.width); ++j) {
        tg.walk(j + T(0.5), i + T(0.5));
        const int64_t n = list.n;
        for (int64_t q = 0; q < n; ++q) {
          w[q] = list.alpha[q] * list.trans[q];
          f[q] = feat + tg.row.id[list.k[q]] * D;
        }
        // channel block outside, contributors inside: the block's sum stays in two registers (two chains
        // halve the add latency per contributor)
        for (int64_t c = 0; c < D; c += V::lanes) {
          typename V::type s0{}, s1{};
          int64_t q = 0;
          for (; q + 1 < n; q += 2) {
            s0 += V::load(f[q] + c) * V::splat(w[q]);
            s1 += V::load(f[q + 1] + c) * V::splat(w[q + 1]);
          }
          if (q < n) s0 += V::load(f[q] + c) * V::splat(w[q]);
          V::store(acc + c, s0 + s1);
        }
        const int64_t pix = b * HW + i * grid.width + j;
        std::copy(acc, acc + split, out_head + pix * split);
        std::copy(acc + split, acc + used, out_tail + pix * (used - split));
        out_alpha[pix] = 1 - list.t_final;
      }
    }
  });
}

// Per pixel the walk is redone, then the contributors are visited back to front with the running sum of what
// lies behind. Gradients are summed into one buffer per thread (no atomics), reduced after the loop.
template <typename T>
void backward_impl(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& opacities,
                   const at::Tensor& features, const at::Tensor& offsets, const at::Tensor& flat_ids,
                   const at::Tensor& v_head, const at::Tensor& v_tail, const at::Tensor& v_alpha, const Grid& grid,
                   at::Tensor& g_means2d, at::Tensor& g_conics, at::Tensor& g_opacities, at::Tensor& g_features) {
  using V = Vec<T>;
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
  T* gm = g_means2d.data_ptr<T>();  // [threads, E, 4]: gradient and its absolute value summed per pixel
  T* gc = g_conics.data_ptr<T>();   // [threads, E, 3]
  T* go = g_opacities.data_ptr<T>();  // [threads, E]
  T* gf = g_features.data_ptr<T>();   // [threads, E, D]
  const int threads = static_cast<int>(g_means2d.size(0));

  std::vector<TileGaussians<T>> scratch(threads);
  std::vector<std::vector<T>> pixel(threads, std::vector<T>(D, T(0)));
  parallel_tasks(n_tiles, threads, [&](int64_t t, int worker) {
    TileGaussians<T>& tg = scratch[worker];
    Contributors<T>& list = tg.list;
    const GaussianSoA<T>& row = tg.row;
    T* vout = pixel[worker].data();  // d loss / d render of this pixel, all D channels (padding stays 0)
    const int64_t b = t / grid.tiles(), tt = t % grid.tiles();
    const int64_t i0 = (tt / grid.tiles_w) * grid.tile_size, j0 = (tt % grid.tiles_w) * grid.tile_size;
    const int64_t start = off[t], end = off[t + 1];
    if (end == start) return;
    tg.gather(m, con, opa, ids, start, end);
    // Per-tile gradients: written in cache, flushed once
    tg.grad_f.assign((end - start) * D, T(0));
    tg.grad_g.assign((end - start) * 8, T(0));
    T* dot = list.dot.data();
    for (int64_t i = i0; i < std::min(i0 + grid.tile_size, grid.height); ++i) {
      tg.select_row(i + T(0.5));
      for (int64_t j = j0; j < std::min(j0 + grid.tile_size, grid.width); ++j) {
        const int64_t pix = b * HW + i * grid.width + j;
        const T px = j + T(0.5), py = i + T(0.5);
        tg.walk(px, py);
        const int64_t n = list.n;
        if (n == 0) continue;
        std::copy(vh + pix * split, vh + (pix + 1) * split, vout);
        std::copy(vt + pix * rest, vt + (pix + 1) * rest, vout + split);
        // feature gradients (w v) and f . v of every contributor: channel vectors of v stay in registers
        for (int64_t q = 0; q < n; ++q) {
          const int64_t k = list.k[q];
          const T w = list.alpha[q] * list.trans[q];
          const T* f = feat + row.id[k] * D;
          T* vf = tg.grad_f.data() + row.local[k] * D;
          typename V::type s{};
          for (int64_t c = 0; c < D; c += V::lanes) {
            const typename V::type v = V::load(vout + c);
            V::store(vf + c, V::load(vf + c) + V::splat(w) * v);
            s += V::load(f + c) * v;
          }
          dot[q] = V::sum(s);
        }
        const T t_final = list.t_final, va_out = va[pix];
        T behind = 0;  // sum over the contributors behind the current one of w_i * (f_i . v_render)
        for (int64_t q = n - 1; q >= 0; --q) {
          const int64_t k = list.k[q];
          const T a = list.alpha[q], vis = list.vis[q], trans = list.trans[q];
          const T raw = row.op[k] * vis;
          const T inv = 1 / (1 - a);
          // d render / d alpha_k = f_k T_k - (contributions behind k) / (1 - alpha_k)
          const T v_a = va_out * t_final * inv + dot[q] * trans - behind * inv;
          behind += a * trans * dot[q];
          if (raw > T(kAlphaMax)) continue;  // clamped: no gradient to o or sigma
          const T dx = row.x[k] - px, dy = row.y[k] - py;
          const T v_sigma = -raw * v_a;
          const T v_mx = (row.ca[k] * dx + row.cb[k] * dy) * v_sigma;
          const T v_my = (row.cb[k] * dx + row.cc[k] * dy) * v_sigma;
          T* vg = tg.grad_g.data() + row.local[k] * 8;
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
    // Gaussians span several tiles handled by any worker: each worker sums into its own buffers.
    T* my_m = gm + worker * E * 4;
    T* my_c = gc + worker * E * 3;
    T* my_o = go + worker * E;
    T* my_f = gf + worker * E * D;
    for (int64_t k = 0; k < end - start; ++k) {
      const int64_t g = tg.tile.id[k];
      const T* src_f = tg.grad_f.data() + k * D;
      const T* src = tg.grad_g.data() + k * 8;
      for (int64_t c = 0; c < D; ++c) my_f[g * D + c] += src_f[c];
      my_m[4 * g] += src[0];
      my_m[4 * g + 1] += src[1];
      my_m[4 * g + 2] += src[6];
      my_m[4 * g + 3] += src[7];
      for (int64_t c = 0; c < 3; ++c) my_c[3 * g + c] += src[2 + c];
      my_o[g] += src[5];
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

// means2d [B, N, 2], radii [B, N, 2] int32, depths [B, N] ->
// (offsets [B * tiles_h * tiles_w + 1] int64, flat_ids [n_isects] int64 into B * N).
std::vector<at::Tensor> bin_gaussians(at::Tensor means2d, at::Tensor radii, at::Tensor depths,
                                      int64_t width, int64_t height, int64_t tile_size) {
  for (auto& [t, n] : {std::pair{means2d, "means2d"}, {radii, "radii"}, {depths, "depths"}})
    check_cpu_contiguous(t, n);
  TORCH_CHECK(radii.scalar_type() == torch::kInt32, "radii must be int32");
  const Grid grid = make_grid(width, height, tile_size);
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "bin_gaussians", [&] {
    result = bin_impl<scalar_t>(means2d, radii, depths, grid);
  });
  return result;
}

// features [B, N, D] (D a multiple of 8, zero padded) are rendered into two images, channels [0, split) and
// [split, used) (e.g. colors and depth), so callers need no slicing: -> (head [B, H, W, split],
// tail [B, H, W, used - split], alpha [B, H, W]).
std::vector<at::Tensor> rasterize_forward(at::Tensor means2d, at::Tensor conics, at::Tensor opacities,
                                          at::Tensor features, at::Tensor offsets, at::Tensor flat_ids,
                                          int64_t split, int64_t used, int64_t width, int64_t height,
                                          int64_t tile_size) {
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
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "rasterize_forward", [&] {
    forward_impl<scalar_t>(means2d, conics, opacities, features, offsets, flat_ids, grid, head, tail, alpha);
  });
  return {head, tail, alpha};
}

// -> gradients w.r.t. (means2d [B, N, 2], conics [B, N, 3], opacities [B, N], features [B, N, D]) and the
// per-pixel absolute means2d gradients summed [B, N, 2] (gsplat's absgrad).
std::vector<at::Tensor> rasterize_backward(at::Tensor means2d, at::Tensor conics, at::Tensor opacities,
                                           at::Tensor features, at::Tensor offsets, at::Tensor flat_ids,
                                           at::Tensor v_head, at::Tensor v_tail, at::Tensor v_alpha,
                                           int64_t width, int64_t height, int64_t tile_size) {
  for (auto& [t, n] : {std::pair{v_head, "v_head"}, {v_tail, "v_tail"}, {v_alpha, "v_alpha"},
                       {features, "features"}, {means2d, "means2d"}, {conics, "conics"}, {opacities, "opacities"}})
    check_cpu_contiguous(t, n);
  check_padded(features);
  const Grid grid = make_grid(width, height, tile_size);
  const int64_t B = features.size(0), N = features.size(1), D = features.size(2);
  TORCH_CHECK(v_head.size(3) + v_tail.size(3) <= D, "more rendered channels than features");
  const int64_t T = num_threads();
  auto opts = features.options();
  auto g_means2d = torch::zeros({T, B, N, 4}, opts);
  auto g_conics = torch::zeros({T, B, N, 3}, opts);
  auto g_opacities = torch::zeros({T, B, N}, opts);
  auto g_features = torch::zeros({T, B, N, D}, opts);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "rasterize_backward", [&] {
    backward_impl<scalar_t>(means2d, conics, opacities, features, offsets, flat_ids, v_head, v_tail, v_alpha, grid,
                            g_means2d, g_conics, g_opacities, g_features);
  });
  auto reduce = [T](const at::Tensor& g) { return T == 1 ? g[0] : g.sum(0); };
  const auto means = reduce(g_means2d);
  return {means.narrow(-1, 0, 2).contiguous(), reduce(g_conics), reduce(g_opacities), reduce(g_features),
          means.narrow(-1, 2, 2).contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bin_gaussians", &bin_gaussians, "Tile binning with per-tile depth sort");
  m.def("rasterize_forward", &rasterize_forward, "Front-to-back tile compositing");
  m.def("rasterize_backward", &rasterize_backward, "Backward of rasterize_forward");
}
