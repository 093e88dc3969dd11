// deform_conv2d (DCNv1/v2) tile kernels: the CUDA twin of deformops/backends/cpu/deform_conv.py.
//
// The host cuts the batch's output pixels (n, p) into tiles of Tc columns: whole images when an
// image has at most Tc pixels (column j is image n0 + j / Tp, pixel p0 + j % Tp), else pieces of
// one image. Per tile:
//   forward:  dc_im2col -> col (Cin*K, Tc), then cupy.matmul per conv group (cuBLAS);
//   backward: grad_col = W^T @ grad_out (cuBLAS); dc_col2im scatters it into grad_input by
//             atomicAdd (or dc_tap_table + gather_segments: deterministic); dc_offset_mask_grad sums
//             over each group's channels per (g, k, column) (no atomics).
// Layouts: x (N, Cin, H, W); offset (N, 2*G*K, P) with channel g*2K + 2k = dy, +1 = dx;
// mask (N, G*K, P) with channel g*K + k (torchvision and mmcv order); col row c*K + k.
// Sampling uses the zero-padding rule of torchvision (mode 'grid-constant', cval 0) and its
// cutoff: the value is 0 when y <= -1, y >= H, x <= -1 or x >= W.
#include "common.cuh"
#include "taps.cuh"

struct ConvGeom {
    int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// Kernel parameters of the convolution geometry (plain ints: every launcher passes int32).
#define CONV_GEOM_PARAMS int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w
#define CONV_GEOM {kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}

// Taps of column j, group g, tap k of the tile. code: 2 = no corner inside, 1 = outside
// torchvision's cutoff with a corner inside (value 0, derivative kept), 0 = inside.
template <typename T, typename I>
__device__ __forceinline__ void conv_taps(const T* __restrict__ offset, const T* __restrict__ mask,
                                          int has_mask, I n, I p, I g, I k, I G, I P, I H, I W,
                                          I Wo, const ConvGeom& cg, AxisTaps& ya, AxisTaps& xa,
                                          Corners& t, int& code, double& m) {
    const I K = (I)cg.kh * cg.kw;
    const I ki = k / cg.kw, kj = k % cg.kw;
    const I oy = p / Wo, ox = p % Wo;
    const T* off = offset + (n * 2 * G * K + g * 2 * K + 2 * k) * P + p;
    // grid position in 64 bits: stride, padding and dilation may be up to 2^31 - 1
    const double y = (double)((long long)oy * cg.stride_h - cg.pad_h + (long long)ki * cg.dil_h)
                     + to_double(off[0]);
    const double x = (double)((long long)ox * cg.stride_w - cg.pad_w + (long long)kj * cg.dil_w)
                     + to_double(off[P]);
    ya = zero_padding_axis(y, H);
    xa = zero_padding_axis(x, W);
    t = corner_taps(ya, xa, W, 0.0);
    const bool outside = !(y > -1.0 && y < (double)H && x > -1.0 && x < (double)W);
    code = t.empty ? 2 : (outside ? 1 : 0);
    m = has_mask ? to_double(mask[(n * G * K + g * K + k) * P + p]) : 1.0;
}

// col[c*K + k, j] = mask * bilinear(x[n, c], y, x) for the channels of chunk `ch` of group g.
// One thread per (chunk, g, k, j), j fastest: stores are coalesced.
template <typename T, typename I>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
dc_im2col(const T* __restrict__ x, const T* __restrict__ offset, const T* __restrict__ mask,
          int has_mask, T* __restrict__ col, I n0, I Tp, I p0, I Tc, I Cin, I H, I W, I G, I Wo,
          I P, I CB, CONV_GEOM_PARAMS) {
    const ConvGeom cg = CONV_GEOM;
    typedef typename Acc<T>::type acc_t;
    const I K = (I)cg.kh * cg.kw, cpg = Cin / G, HW = H * W;
    const I nch = (cpg + CB - 1) / CB;
    GRID_LOOP(t, (long long)nch * G * K * Tc) {
        const I j = (I)(t % Tc), k = (I)((t / Tc) % K), g = (I)((t / ((long long)Tc * K)) % G);
        const I ch = (I)(t / ((long long)Tc * K * G));
        const I n = n0 + j / Tp, p = p0 + j % Tp;
        AxisTaps ya, xa;
        Corners tp;
        int code;
        double m;
        conv_taps<T, I>(offset, mask, has_mask, n, p, g, k, G, P, H, W, Wo, cg, ya, xa, tp, code, m);
        const acc_t mk = (acc_t)m;
        const acc_t w0 = (acc_t)tp.w[0] * mk, w1 = (acc_t)tp.w[1] * mk;
        const acc_t w2 = (acc_t)tp.w[2] * mk, w3 = (acc_t)tp.w[3] * mk;
        const I i0 = (I)tp.i[0], i1 = (I)tp.i[1], i2 = (I)tp.i[2], i3 = (I)tp.i[3];
        const I c0 = g * cpg + ch * CB, c1 = min(c0 + CB, (g + 1) * cpg);
        for (I c = c0; c < c1; ++c) {
            acc_t v = 0;
            if (!code) {
                const T* s = x + (n * Cin + c) * HW;
                v = w0 * to_acc(s[i0]) + w1 * to_acc(s[i1]) + w2 * to_acc(s[i2]) + w3 * to_acc(s[i3]);
            }
            store(col + (c * K + k) * Tc + j, v);
        }
    }
}

// grad_input accumulator gxa (acc_t, N*Cin*H*W) += scatter of grad_col * mask * weights, by
// atomicAdd. Same thread layout as dc_im2col.
template <typename T, typename I>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
dc_col2im(const T* __restrict__ grad_col, const T* __restrict__ offset, const T* __restrict__ mask,
          int has_mask, typename Acc<T>::type* __restrict__ gxa, I n0, I Tp, I p0, I Tc, I Cin,
          I H, I W, I G, I Wo, I P, I CB, CONV_GEOM_PARAMS) {
    const ConvGeom cg = CONV_GEOM;
    typedef typename Acc<T>::type acc_t;
    const I K = (I)cg.kh * cg.kw, cpg = Cin / G, HW = H * W;
    const I nch = (cpg + CB - 1) / CB;
    GRID_LOOP(t, (long long)nch * G * K * Tc) {
        const I j = (I)(t % Tc), k = (I)((t / Tc) % K), g = (I)((t / ((long long)Tc * K)) % G);
        const I ch = (I)(t / ((long long)Tc * K * G));
        const I n = n0 + j / Tp, p = p0 + j % Tp;
        AxisTaps ya, xa;
        Corners tp;
        int code;
        double m;
        conv_taps<T, I>(offset, mask, has_mask, n, p, g, k, G, P, H, W, Wo, cg, ya, xa, tp, code, m);
        // no corner inside, or torchvision's cutoff (value 0 whatever x): no input gradient
        if (code != 0) continue;
        const acc_t mk = (acc_t)m;
        acc_t wm[4];
        for (int q = 0; q < 4; ++q) wm[q] = (acc_t)tp.w[q] * mk;
        const I c0 = g * cpg + ch * CB, c1 = min(c0 + CB, (g + 1) * cpg);
        for (I c = c0; c < c1; ++c) {
            const acc_t v = to_acc(grad_col[(c * K + k) * Tc + j]);
            acc_t* d = gxa + (n * Cin + c) * HW;
            for (int q = 0; q < 4; ++q)
                if (wm[q] != (acc_t)0) atomicAdd(d + (I)tp.i[q], wm[q] * v);
        }
    }
}

// Deterministic grad_input, step 1: entry ((g*K + k)*4 + q)*Tc + j holds corner q of column j,
// group g, tap k: key = (j / Tp * G + g) * H*W + pixel (or sentinel), weight * mask, and
// src = k*Tc + j, so that gather_segments reads grad_col[c*K*Tc + src] (c_stride = K*Tc).
template <typename T, typename I>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
dc_tap_table(const T* __restrict__ offset, const T* __restrict__ mask, int has_mask,
             long long* __restrict__ key, typename Acc<T>::type* __restrict__ weight,
             long long* __restrict__ src, I n0, I Tp, I p0, I Tc, I H, I W, I G, I Wo, I P,
             CONV_GEOM_PARAMS, long long sentinel) {
    const ConvGeom cg = CONV_GEOM;
    typedef typename Acc<T>::type acc_t;
    const I K = (I)cg.kh * cg.kw;
    GRID_LOOP(t, (long long)G * K * Tc) {
        const I j = (I)(t % Tc), k = (I)((t / Tc) % K), g = (I)(t / ((long long)Tc * K));
        const I nl = j / Tp, p = p0 + j % Tp;
        AxisTaps ya, xa;
        Corners tp;
        int code;
        double m;
        conv_taps<T, I>(offset, mask, has_mask, n0 + nl, p, g, k, G, P, H, W, Wo, cg, ya, xa, tp, code, m);
        const acc_t mk = (acc_t)m;
        for (int q = 0; q < 4; ++q) {
            const acc_t w = (acc_t)tp.w[q] * mk;
            const long long e = ((long long)(g * K + k) * 4 + q) * Tc + j;
            const bool used = code == 0 && w != (acc_t)0;  // as dc_col2im
            key[e] = used ? ((long long)nl * G + g) * H * W + tp.i[q] : sentinel;
            weight[e] = w;
            src[e] = (long long)k * Tc + j;
        }
    }
}

// sum_q c_q S_q over the corners 00, 01, 10, 11 (S_q a corner's sum over the channels) from S_0
// and three sums of neighbouring pixels' differences: along y, (u, v, w) = (Dx0, Dy0, Dy1) and
// the sum is C S_0 + (c1 + c3) u + c2 v + c3 w; else (Dx0, Dy0, Dx1) and C S_0 + c1 u +
// (c2 + c3) v + c3 w (C = c0 + c1 + c2 + c3; Dx0 = S_01 - S_00, Dx1 = S_11 - S_10,
// Dy0 = S_10 - S_00, Dy1 = S_11 - S_01). For a derivative along y (x) inside the image C and
// c1 + c3 (c2 + c3) are 0, and the large S_0 and the differences across it add nothing.
template <typename A>
__device__ __forceinline__ A corner_sum(const double c[4], A s0, A u, A v, A w, bool along_y) {
    const double C = c[0] + c[1] + c[2] + c[3];
    const double a = along_y ? c[1] + c[3] : c[1];
    const double b = along_y ? c[2] : c[2] + c[3];
    A r = (A)c[3] * w;
    if (a != 0.0) r += (A)a * u;
    if (b != 0.0) r += (A)b * v;
    if (C != 0.0) r += (A)C * s0;
    return r;
}

// Offset and mask gradients of the tile: one thread per (g, k, j) sums
// S_q = sum_c grad_col[c*K + k, j] * x[n, c, corner q] over the channels of group g (no
// atomics), then d/dy = mask * sum_q ay_q S_q, d/dx likewise, d/dmask = sum_q w_q S_q. The
// sums are kept as S_0 and four sums of neighbouring pixels' differences (corner_sum): the
// derivatives are small differences of the S_q where the image has a large mean or a steep
// edge across the derivative, which float sums of the S_q themselves lost; neighbouring
// pixels' differences are exact. Where a sum is not finite (an infinite pixel: Inf - Inf),
// the corners' own sums are taken instead (an infinite gradient, not NaN).
// grad_offset (N, 2GK, P), grad_mask (N, GK, P).
template <typename T, typename I>
__global__ void __launch_bounds__(DEFORMOPS_THREADS)
dc_offset_mask_grad(const T* __restrict__ x, const T* __restrict__ grad_col,
                    const T* __restrict__ offset, const T* __restrict__ mask, int has_mask,
                    T* __restrict__ grad_offset, T* __restrict__ grad_mask, int need_offset,
                    int need_mask, I n0, I Tp, I p0, I Tc, I Cin, I H, I W, I G, I Wo, I P,
                    CONV_GEOM_PARAMS) {
    const ConvGeom cg = CONV_GEOM;
    typedef typename Acc<T>::type acc_t;
    const I K = (I)cg.kh * cg.kw, cpg = Cin / G, HW = H * W;
    GRID_LOOP(t, (long long)G * K * Tc) {
        const I j = (I)(t % Tc), k = (I)((t / Tc) % K), g = (I)(t / ((long long)Tc * K));
        const I n = n0 + j / Tp, p = p0 + j % Tp;
        AxisTaps ya, xa;
        Corners tp;
        int code;
        double m;
        conv_taps<T, I>(offset, mask, has_mask, n, p, g, k, G, P, H, W, Wo, cg, ya, xa, tp, code, m);
        acc_t s0 = 0, dx0 = 0, dy0 = 0, dy1 = 0, dx1 = 0, s1 = 0, s2 = 0, s3 = 0;
        const I i0 = (I)tp.i[0], i1 = (I)tp.i[1], i2 = (I)tp.i[2], i3 = (I)tp.i[3];
        if (code != 2) {  // samples with no corner inside read no pixel
            for (I c = g * cpg; c < (g + 1) * cpg; ++c) {
                const acc_t gc = to_acc(grad_col[(c * K + k) * Tc + j]);
                const T* s = x + (n * Cin + c) * HW;
                const acc_t a0 = to_acc(s[i0]), a1 = to_acc(s[i1]), a2 = to_acc(s[i2]),
                            a3 = to_acc(s[i3]);
                s0 += gc * a0;
                dx0 += gc * (a1 - a0);
                dy0 += gc * (a2 - a0);
                dy1 += gc * (a3 - a1);
                dx1 += gc * (a3 - a2);
            }
        }
        const bool finite = isfinite(s0 + dx0 + dy0 + dy1 + dx1);
        if (!finite) {  // the corners' own sums (s0 is the first's)
            for (I c = g * cpg; c < (g + 1) * cpg; ++c) {
                const acc_t gc = to_acc(grad_col[(c * K + k) * Tc + j]);
                const T* s = x + (n * Cin + c) * HW;
                s1 += gc * to_acc(s[i1]);
                s2 += gc * to_acc(s[i2]);
                s3 += gc * to_acc(s[i3]);
            }
        }
        if (need_offset) {
            const Slopes sl = corner_slopes(ya, xa, 0.0);
            const acc_t mm = code < 2 ? (acc_t)m : (acc_t)0;
            const acc_t dy = finite ? corner_sum(sl.ay, s0, dx0, dy0, dy1, true)
                : (acc_t)sl.ay[0] * s0 + (acc_t)sl.ay[1] * s1 + (acc_t)sl.ay[2] * s2
                  + (acc_t)sl.ay[3] * s3;
            const acc_t dx = finite ? corner_sum(sl.ax, s0, dx0, dy0, dx1, false)
                : (acc_t)sl.ax[0] * s0 + (acc_t)sl.ax[1] * s1 + (acc_t)sl.ax[2] * s2
                  + (acc_t)sl.ax[3] * s3;
            T* go = grad_offset + (n * 2 * G * K + g * 2 * K + 2 * k) * P + p;
            store(go, mm * dy);
            store(go + P, mm * dx);
        }
        if (need_mask) {
            const acc_t dm = finite ? corner_sum(tp.w, s0, dx0, dy0, dy1, true)
                : (acc_t)tp.w[0] * s0 + (acc_t)tp.w[1] * s1 + (acc_t)tp.w[2] * s2
                  + (acc_t)tp.w[3] * s3;
            store(grad_mask + (n * G * K + g * K + k) * P + p, code ? (acc_t)0 : dm);
        }
    }
}
