// sample / deform_sample (and map_coordinates) forward and backward: the CUDA twin of
// deformops/backends/cpu/sampling.py.
//
// Memory orders (C-contiguous), chosen by the template flag CL (channels last):
//   CL = false: x (N, C, H, W), coords (N, 2G, Ho, Wo), out (N, C, Ho, Wo)
//   CL = true:  x (N, H, W, C), coords (N, Ho, Wo, 2G), out (N, Ho, Wo, C)
// With relative != 0 the coordinates are offsets from the output grid (deform_sample).
//
// Forward and atomic input gradient: a block takes PB output points and GB groups of one image.
// It first stores the taps of its (point, group) pairs in shared memory (one tap computation per
// point and group), then its threads walk the (point, channel) elements with the contiguous axis
// fastest, so that loads of coordinates and grad_out and stores of out are coalesced.
// Coordinate gradient: a thread (NCHW) or a warp (NHWC) per (image, group, point) sums over the
// group's channels in a fixed order: no atomics, bit-identical from run to run.
// Deterministic input gradient: sample_tap_table lists every (point, corner) with its pixel key;
// the host sorts the keys and gather_segments sums each pixel's entries in a fixed order.
#include "common.cuh"
#include "taps.cuh"

// Sample point of output point p of image n, group g.
template <typename T, typename I, bool CL>
__device__ __forceinline__ void read_point(const T* __restrict__ coords, I n, I g, I p, I G, I P,
                                           I Wo, int relative, double& y, double& x) {
    if (CL) {
        const T* c = coords + ((n * P + p) * 2 * G + 2 * g);
        y = to_double(c[0]);
        x = to_double(c[1]);
    } else {
        y = to_double(coords[(n * 2 * G + 2 * g) * P + p]);
        x = to_double(coords[(n * 2 * G + 2 * g + 1) * P + p]);
    }
    if (relative) {
        y += (double)(p / Wo);
        x += (double)(p % Wo);
    }
}

// Shared-memory tap table of a block, E = PB * GB entries (entry e = j * gb + g - g0), stored
// by corner (idx[k*E + e], w[k*E + e]) so that a warp reading 32 consecutive entries hits 32
// banks. Bytes: E * (4 * sizeof(I) + 5 * sizeof(acc_t) + 4), laid out idx | w | bias | empty.
template <typename T, typename I>
struct TapTable {
    typedef typename Acc<T>::type acc_t;
    I E;
    I* idx;
    acc_t* w;
    acc_t* bias;
    int* empty;
    __device__ TapTable(unsigned char* smem, I E_) : E(E_) {
        idx = reinterpret_cast<I*>(smem);
        w = reinterpret_cast<acc_t*>(idx + 4 * E);
        bias = w + 4 * E;
        empty = reinterpret_cast<int*>(bias + E);
    }
};

template <typename T, typename I, bool CL>
__device__ __forceinline__ void stage_taps(TapTable<T, I>& tab, const T* __restrict__ coords, I n,
                                           I p0, I m, I g0, I gb, I G, I P, I Wo, I H, I W,
                                           int order, int mode, double cval, int relative) {
    typedef typename Acc<T>::type acc_t;
    for (I e = threadIdx.x; e < m * gb; e += blockDim.x) {
        const I j = e / gb, g = g0 + e % gb;
        double y, x;
        read_point<T, I, CL>(coords, n, g, p0 + j, G, P, Wo, relative, y, x);
        const AxisTaps ya = axis_taps(y, H, mode, order);
        const AxisTaps xa = axis_taps(x, W, mode, order);
        const Corners t = corner_taps(ya, xa, W, cval);
        for (int k = 0; k < 4; ++k) {
            tab.idx[k * tab.E + e] = (I)t.i[k];
            tab.w[k * tab.E + e] = (acc_t)t.w[k];
        }
        tab.bias[e] = (acc_t)t.bias;
        tab.empty[e] = t.empty ? 1 : 0;
    }
}

// Work of block b of the staged kernels: image n, points p0 .. p0+m-1, groups g0 .. g0+gb-1.
template <typename I>
__device__ __forceinline__ void block_work(long long b, I P, I G, I PB, I GB, I& n, I& p0, I& m,
                                           I& g0, I& gb) {
    const I nbp = (P + PB - 1) / PB, nbg = (G + GB - 1) / GB;
    g0 = (I)(b % nbg) * GB;
    p0 = (I)((b / nbg) % nbp) * PB;
    n = (I)(b / ((long long)nbg * nbp));
    m = min(PB, P - p0);
    gb = min(GB, G - g0);
}

// out = sample(x, coords). Grid: blocks over (image, block of PB points, block of GB groups);
// dynamic shared memory: a TapTable of PB * GB entries.
template <typename T, typename I, bool CL>
__global__ void __launch_bounds__(DEFORMOPS_THREADS, 3)
sample_forward(const T* __restrict__ x, const T* __restrict__ coords, T* __restrict__ out, I N,
               I C, I H, I W, I G, I Ho, I Wo, I PB, I GB, int order, int mode, double cval,
               int relative) {
    typedef typename Acc<T>::type acc_t;
    extern __shared__ __align__(16) unsigned char smem[];
    TapTable<T, I> tab(smem, PB * GB);
    const I P = Ho * Wo, HW = H * W, cpg = C / G;
    const long long nblocks = (long long)N * ((P + PB - 1) / PB) * ((G + GB - 1) / GB);
    for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
        I n, p0, m, g0, gb;
        block_work<I>(b, P, G, PB, GB, n, p0, m, g0, gb);
        stage_taps<T, I, CL>(tab, coords, n, p0, m, g0, gb, G, P, Wo, H, W, order, mode, cval, relative);
        __syncthreads();
        const I cb = gb * cpg;  // channels g0*cpg .. g0*cpg + cb - 1
        for (I e = threadIdx.x; e < m * cb; e += blockDim.x) {
            I j, cl;
            if (CL) { j = e / cb; cl = e % cb; } else { cl = e / m; j = e % m; }
            const I c = g0 * cpg + cl, s = j * gb + cl / cpg;
            const T* plane = CL ? x + n * HW * C + c : x + (n * C + c) * HW;
            const I step = CL ? C : 1;
            const acc_t bias = tab.bias[s];
            acc_t v = bias;
            if (!tab.empty[s]) {
                const I E = tab.E;
                const I* i = tab.idx + s;
                const acc_t* w = tab.w + s;
                // order 0: tap 0 alone (the others point at its pixel with weight 0, and
                // 0 * Inf would be NaN where scipy reads an infinite pixel once)
                v = order == 0 ? bias + w[0] * to_acc(plane[i[0] * step])
                    : bias + w[0] * to_acc(plane[i[0] * step]) + w[E] * to_acc(plane[i[E] * step])
                      + w[2 * E] * to_acc(plane[i[2 * E] * step])
                      + w[3 * E] * to_acc(plane[i[3 * E] * step]);
            }
            store(out + (CL ? (n * P + p0 + j) * C + c : (n * C + c) * P + p0 + j), v);
        }
        __syncthreads();
    }
}

// grad_x (accumulator gxa, zeroed by the caller, acc_t) += scatter of grad_out with the
// forward's weights, by atomicAdd. Same grid and shared memory as sample_forward.
template <typename T, typename I, bool CL>
__global__ void __launch_bounds__(DEFORMOPS_THREADS, 3)
sample_backward_input(const T* __restrict__ grad_out, const T* __restrict__ coords,
                      typename Acc<T>::type* __restrict__ gxa, I N, I C, I H, I W, I G, I Ho,
                      I Wo, I PB, I GB, int order, int mode, double cval, int relative) {
    typedef typename Acc<T>::type acc_t;
    extern __shared__ __align__(16) unsigned char smem[];
    TapTable<T, I> tab(smem, PB * GB);
    const I P = Ho * Wo, HW = H * W, cpg = C / G;
    const long long nblocks = (long long)N * ((P + PB - 1) / PB) * ((G + GB - 1) / GB);
    for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
        I n, p0, m, g0, gb;
        block_work<I>(b, P, G, PB, GB, n, p0, m, g0, gb);
        stage_taps<T, I, CL>(tab, coords, n, p0, m, g0, gb, G, P, Wo, H, W, order, mode, cval, relative);
        __syncthreads();
        const I cb = gb * cpg;
        for (I e = threadIdx.x; e < m * cb; e += blockDim.x) {
            I j, cl;
            if (CL) { j = e / cb; cl = e % cb; } else { cl = e / m; j = e % m; }
            const I c = g0 * cpg + cl, s = j * gb + cl / cpg;
            if (tab.empty[s]) continue;  // constant output: no pixel was read
            const acc_t gv = to_acc(grad_out[CL ? (n * P + p0 + j) * C + c : (n * C + c) * P + p0 + j]);
            acc_t* plane = CL ? gxa + n * HW * C + c : gxa + (n * C + c) * HW;
            const I step = CL ? C : 1;
            for (int k = 0; k < 4; ++k) {
                const acc_t w = tab.w[k * tab.E + s];
                if (w != (acc_t)0) atomicAdd(plane + tab.idx[k * tab.E + s] * step, w * gv);
            }
        }
        __syncthreads();
    }
}

// grad_coords, NCHW: one thread per (image, group, point) sums over the group's channels.
template <typename T, typename I>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
sample_backward_coords_nchw(const T* __restrict__ grad_out, const T* __restrict__ x,
                            const T* __restrict__ coords, T* __restrict__ grad_coords, I N, I C,
                            I H, I W, I G, I Ho, I Wo, int order, int mode, double cval,
                            int relative) {
    typedef typename Acc<T>::type acc_t;
    const I P = Ho * Wo, HW = H * W, cpg = C / G;
    GRID_LOOP(t, (long long)N * G * P) {
        const I n = (I)(t / ((long long)G * P)), g = (I)((t / P) % G), p = (I)(t % P);
        double y, xx;
        read_point<T, I, false>(coords, n, g, p, G, P, Wo, relative, y, xx);
        const AxisTaps ya = axis_taps(y, H, mode, order, true);
        const AxisTaps xa = axis_taps(xx, W, mode, order, true);
        const Corners tp = corner_taps(ya, xa, W, cval);
        acc_t sum_y = 0, sum_x = 0;
        if (!tp.empty) {  // else: constant output, zero gradient, no pixel read
            const Slopes sl = corner_slopes(ya, xa, cval);
            const I i0 = (I)tp.i[0], i1 = (I)tp.i[1], i2 = (I)tp.i[2], i3 = (I)tp.i[3];
            const acc_t a0 = (acc_t)sl.ay[0], a1 = (acc_t)sl.ay[1], a2 = (acc_t)sl.ay[2], a3 = (acc_t)sl.ay[3];
            const acc_t b0 = (acc_t)sl.ax[0], b1 = (acc_t)sl.ax[1], b2 = (acc_t)sl.ax[2], b3 = (acc_t)sl.ax[3];
            const acc_t cy = (acc_t)sl.cy, cx = (acc_t)sl.cx;
            for (I c = g * cpg; c < (g + 1) * cpg; ++c) {
                const T* plane = x + (n * C + c) * HW;
                const acc_t u0 = to_acc(plane[i0]), u1 = to_acc(plane[i1]);
                const acc_t u2 = to_acc(plane[i2]), u3 = to_acc(plane[i3]);
                const acc_t gv = to_acc(grad_out[(n * C + c) * P + p]);
                sum_y += gv * (cy + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3);
                sum_x += gv * (cx + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3);
            }
        }
        store(grad_coords + (n * 2 * G + 2 * g) * P + p, sum_y);
        store(grad_coords + (n * 2 * G + 2 * g + 1) * P + p, sum_x);
    }
}

// grad_coords, NHWC: one warp per (image, point, group); lanes stride the group's channels
// (coalesced), then a fixed shuffle tree sums the lanes.
template <typename T, typename I>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
sample_backward_coords_nhwc(const T* __restrict__ grad_out, const T* __restrict__ x,
                            const T* __restrict__ coords, T* __restrict__ grad_coords, I N, I C,
                            I H, I W, I G, I Ho, I Wo, int order, int mode, double cval,
                            int relative) {
    typedef typename Acc<T>::type acc_t;
    const I P = Ho * Wo, cpg = C / G;
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)N * P * G;
    const long long stride = ((long long)blockDim.x * gridDim.x) >> 5;
    for (long long t = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < warps; t += stride) {
        const I n = (I)(t / ((long long)P * G)), p = (I)((t / G) % P), g = (I)(t % G);
        double y, xx;
        read_point<T, I, true>(coords, n, g, p, G, P, Wo, relative, y, xx);
        const AxisTaps ya = axis_taps(y, H, mode, order, true);
        const AxisTaps xa = axis_taps(xx, W, mode, order, true);
        const Corners tp = corner_taps(ya, xa, W, cval);
        acc_t sum_y = 0, sum_x = 0;
        if (!tp.empty) {
            const Slopes sl = corner_slopes(ya, xa, cval);
            const T* r0 = x + (n * H * W + (I)tp.i[0]) * C;
            const T* r1 = x + (n * H * W + (I)tp.i[1]) * C;
            const T* r2 = x + (n * H * W + (I)tp.i[2]) * C;
            const T* r3 = x + (n * H * W + (I)tp.i[3]) * C;
            const T* go = grad_out + (n * P + p) * C;
            const acc_t a0 = (acc_t)sl.ay[0], a1 = (acc_t)sl.ay[1], a2 = (acc_t)sl.ay[2], a3 = (acc_t)sl.ay[3];
            const acc_t b0 = (acc_t)sl.ax[0], b1 = (acc_t)sl.ax[1], b2 = (acc_t)sl.ax[2], b3 = (acc_t)sl.ax[3];
            const acc_t cy = (acc_t)sl.cy, cx = (acc_t)sl.cx;
            for (I c = g * cpg + lane; c < (g + 1) * cpg; c += 32) {
                const acc_t u0 = to_acc(r0[c]), u1 = to_acc(r1[c]), u2 = to_acc(r2[c]), u3 = to_acc(r3[c]);
                const acc_t gv = to_acc(go[c]);
                sum_y += gv * (cy + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3);
                sum_x += gv * (cx + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3);
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            sum_y += __shfl_down_sync(0xffffffffu, sum_y, off);
            sum_x += __shfl_down_sync(0xffffffffu, sum_x, off);
        }
        if (lane == 0) {
            store(grad_coords + (n * P + p) * 2 * G + 2 * g, sum_y);
            store(grad_coords + (n * P + p) * 2 * G + 2 * g + 1, sum_x);
        }
    }
}

// Deterministic input gradient, step 1: entry ((n*G + g)*P + p)*4 + k holds corner k of point
// p of image n, group g: key = (n*G + g)*H*W + pixel (or `sentinel` for corners that read no
// pixel), its weight, and src = p (where the gathered value lives).
template <typename T, typename I, bool CL>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
sample_tap_table(const T* __restrict__ coords, long long* __restrict__ key,
                 typename Acc<T>::type* __restrict__ weight, long long* __restrict__ src, I N,
                 I H, I W, I G, I Ho, I Wo, int order, int mode, double cval, int relative,
                 long long sentinel) {
    typedef typename Acc<T>::type acc_t;
    const I P = Ho * Wo;
    GRID_LOOP(t, (long long)N * G * P) {
        const I n = (I)(t / ((long long)G * P)), g = (I)((t / P) % G), p = (I)(t % P);
        double y, x;
        read_point<T, I, CL>(coords, n, g, p, G, P, Wo, relative, y, x);
        const Corners tp = corner_taps(axis_taps(y, H, mode, order), axis_taps(x, W, mode, order), W, cval);
        for (int k = 0; k < 4; ++k) {
            const acc_t w = (acc_t)tp.w[k];
            const bool used = !tp.empty && w != (acc_t)0;
            key[4 * t + k] = used ? ((long long)n * G + g) * H * W + tp.i[k] : sentinel;
            weight[4 * t + k] = w;
            src[4 * t + k] = p;
        }
    }
}

// Deterministic input gradient, step 2 (also deform_conv2d's): the sorted table cut into
// segments of one key (n*G + g)*HW + pixel each, entries seg_start[s] .. seg_start[s+1]-1 (keys
// >= nkeys mark unused entries and are skipped). Thread (segment, channel c of its group) adds
// sum_e weight[e] * vals[n*n_stride + c*c_stride + src[e]*s_stride], in table order, to
// gxa[n, c, pixel] (NCHW) or gxa[n, pixel, c] (channels_last): work in proportion to the table,
// whatever the image size, and no two threads write one element. Channels fastest for
// channels_last, segments (consecutive pixels) fastest for NCHW: coalesced stores.
template <typename T, typename I>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
gather_segments(const long long* __restrict__ seg_key, const long long* __restrict__ seg_start,
                long long nseg, const typename Acc<T>::type* __restrict__ weight,
                const long long* __restrict__ src, const T* __restrict__ vals,
                typename Acc<T>::type* __restrict__ gxa, I C, I G, I HW, I n_stride, I c_stride,
                I s_stride, int channels_last, long long nkeys) {
    typedef typename Acc<T>::type acc_t;
    const I cpg = C / G;
    GRID_LOOP(t, nseg * cpg) {
        const long long s = channels_last ? t / cpg : t % nseg;
        const I cc = (I)(channels_last ? t % cpg : t / nseg);
        const long long key = seg_key[s];
        if (key >= nkeys) continue;
        const I pix = (I)(key % HW), g = (I)((key / HW) % G), n = (I)(key / ((long long)HW * G));
        const I c = g * cpg + cc;
        const T* v = vals + n * n_stride + c * c_stride;
        acc_t sum = 0;
        for (long long e = seg_start[s]; e < seg_start[s + 1]; ++e)
            sum += weight[e] * to_acc(v[(I)src[e] * s_stride]);
        gxa[channels_last ? ((long long)n * HW + pix) * C + c : ((long long)n * C + c) * HW + pix]
            += sum;
    }
}
