// Per-point taps shared by every sampling kernel: the CUDA twin of
// deformops/backends/cpu/_taps.py, with the same names and the same arithmetic (double).
//
// A point (y, x) becomes four corner taps 00, 01, 10, 11 = (y_low, x_low), (y_low, x_high),
// (y_high, x_low), (y_high, x_high), each with a flat index into the H*W plane and a weight.
// Corners that read cval (mode 'grid-constant' outside the image) get weight 0 and move
// cval * weight into a per-point bias; they borrow the other tap of their axis, so that every
// index is a pixel inside the image. A point with no corner inside is `empty`: its value is the
// bias and no pixel is read. Boundary handling reproduces scipy.ndimage.map_coordinates.
#pragma once

struct AxisTaps {
    long long i_low, i_high;  // mapped into [0, n), or -1: the tap reads cval
    double l, h;              // weights of i_low and i_high (h = 1 - l)
    double sign;              // d(mapped coordinate) / d(coordinate): +1, -1 or 0
    bool ok;                  // false: the value is cval without interpolation
};

struct Corners {
    long long i[4];  // flat indices of corners 00, 01, 10, 11
    double w[4];     // weights (0 for corners that read cval)
    double bias;     // cval times the weights of the corners that read it
    bool empty;      // no corner inside: the value is bias, read no pixel
};

struct Slopes {
    double ay[4], ax[4];  // d value / dy = cy + sum_k ay[k] * plane[i[k]] (likewise x)
    double cy, cx;
};

// Map an integer tap index into [0, n); -1 means the tap reads cval.
__device__ __forceinline__ long long map_tap(long long i, long long n, int mode) {
    if (i >= 0 && i < n) return i;
    if (mode == MODE_GRID_CONSTANT) return -1;
    if (n <= 1) return 0;
    if (mode == MODE_NEAREST) return i < 0 ? 0 : n - 1;
    if (mode == MODE_REFLECT) {
        long long p = 2 * n;
        long long r = floor_mod(i, p);
        return r < n ? r : p - 1 - r;
    }
    if (mode == MODE_GRID_WRAP) return floor_mod(i, n);
    // MIRROR; scipy also mirrors the edge taps of CONSTANT and WRAP.
    long long p = 2 * n - 2;
    long long r = floor_mod(i, p);
    return r < n ? r : p - r;
}

// Map a finite coordinate c along an axis of length n by the boundary mode (in place).
// Sets sign = d(c_mapped)/dc; returns false when the output is cval without interpolation.
__device__ __forceinline__ bool map_coordinate(double& c, double& sign, long long n, int mode) {
    sign = 1.0;
    const double nd = (double)n;
    if (mode == MODE_GRID_CONSTANT) {
        // beyond one pixel outside every tap reads cval: move the point into [-3, -2) or
        // [n + 1, n + 2) so the index stays small, keeping its fraction (scipy's weights)
        if (c < -2.0) { c = -3.0 + (c - floor(c)); sign = 0.0; }
        else if (c > nd + 1.0) { c = nd + 1.0 + (c - floor(c)); sign = 0.0; }
        return true;
    }
    if (mode == MODE_NEAREST) {
        if (c < -1.0) { c = -1.0; sign = 0.0; }
        else if (c > nd) { c = nd; sign = 0.0; }
        return true;
    }
    if (c < 0.0) {
        if (mode == MODE_CONSTANT) { sign = 0.0; return false; }
        if (n <= 1) { c = 0.0; sign = 0.0; return true; }
        if (mode == MODE_MIRROR) {
            double p = 2.0 * nd - 2.0;
            double r = fmod(-c, p);
            if (r >= nd - 1.0) {
                c = p - r;
            } else {
                c = r;
                sign = -1.0;
            }
        } else if (mode == MODE_REFLECT) {
            double p = 2.0 * nd;
            if (c < -p) c = -fmod(-c, p);
            if (c < -nd) {
                c = c + p;
            } else {
                // as scipy: keep (-c - 1) away from exactly -1
                c = (c > -1e-15 ? 1e-15 : -c) - 1.0;
                sign = -1.0;
            }
        } else if (mode == MODE_WRAP) {
            c = (nd - 1.0) - fmod(-c, nd - 1.0);
        } else {  // GRID_WRAP: c + n*k for the k that lands in [0, n), as scipy, but exact
            c = fmod(c, nd);
            c = c < 0.0 ? c + nd : 0.0;
        }
    } else if (c > nd - 1.0) {
        if (mode == MODE_CONSTANT) { sign = 0.0; return false; }
        if (n <= 1) { c = 0.0; sign = 0.0; return true; }
        if (mode == MODE_MIRROR) {
            double p = 2.0 * nd - 2.0;
            c = fmod(c, p);
            if (c >= nd) { c = p - c; sign = -1.0; }
        } else if (mode == MODE_REFLECT) {
            double p = 2.0 * nd;
            c = fmod(c, p);
            if (c >= nd) { c = p - c - 1.0; sign = -1.0; }
        } else if (mode == MODE_WRAP) {
            c = fmod(c, nd - 1.0);
        } else {  // GRID_WRAP
            c = fmod(c, nd);
        }
    }
    return c > -1.0;
}

// Taps along one axis (see AxisTaps). For order 0 only i_low is used (weight 1). With `slopes`
// (taps for a coordinate gradient), an integer point on a mirrored stretch gets the cell on the
// other side of its pixel (see below); the value is the same.
__device__ __forceinline__ AxisTaps axis_taps(double c, long long n, int mode, int order,
                                              bool slopes = false) {
    AxisTaps a;
    a.i_low = 0; a.i_high = 0; a.l = 0.0; a.h = 0.0; a.sign = 0.0; a.ok = false;
    if (!isfinite(c)) return a;
    const double c_in = c;
    double sign;
    if (!map_coordinate(c, sign, n, mode)) return a;
    int tap_mode = (mode == MODE_CONSTANT || mode == MODE_WRAP) ? MODE_MIRROR : mode;
    a.ok = true;
    if (order == 0) {  // the high tap gets weight 0 and points at the low one
        long long i = map_tap((long long)floor(c + 0.5), n, tap_mode);
        a.i_low = i; a.i_high = i; a.l = 1.0;
        return a;
    }
    // An exact multiple of the period far left ('reflect'): scipy's cell (the forward keeps it)
    // is the flat mirrored one left of the point; the right-hand derivative is the cell right
    // of it, [0, 1], as at 0. Same value.
    if (slopes && mode == MODE_REFLECT && c_in < 0.0 && n > 1
        && fmod(-c_in, 2.0 * (double)n) == 0.0) {
        c = 0.0;
        sign = 1.0;
    }
    double f = floor(c);
    // On a mirrored stretch c runs against the caller's coordinate: the cell to the right of the
    // point is the one below c, and it gives the right-hand derivative (DESIGN §4). Same value
    // (weight 1 on c's own tap, 0 on the other); the forward keeps scipy's cell, so that a NaN
    // pixel reaches the samples scipy's reaches.
    if (slopes && sign < 0.0 && f == c) f -= 1.0;
    long long i = (long long)f;
    a.l = 1.0 - (c - f);
    a.h = 1.0 - a.l;
    a.i_low = map_tap(i, n, tap_mode);
    a.i_high = map_tap(i + 1, n, tap_mode);
    a.sign = sign;
    return a;
}

// axis_taps for mode 'grid-constant', order 1, without the mode dispatch (deform_conv2d).
// Points at or beyond two pixels outside (and non-finite ones) have both taps outside and sign 0.
__device__ __forceinline__ AxisTaps zero_padding_axis(double c, long long n) {
    AxisTaps a;
    a.ok = true;
    if (!(c > -2.0 && c < (double)n + 1.0)) {
        a.i_low = -1; a.i_high = -1; a.l = 0.0; a.h = 0.0; a.sign = 0.0;
        return a;
    }
    double f = floor(c);
    long long i = (long long)f;
    a.l = 1.0 - (c - f);
    a.h = 1.0 - a.l;
    a.i_low = (i >= 0 && i < n) ? i : -1;
    a.i_high = (i + 1 >= 0 && i + 1 < n) ? i + 1 : -1;
    a.sign = 1.0;
    return a;
}

// Corner taps of a point from its axis taps (see Corners).
__device__ __forceinline__ Corners corner_taps(const AxisTaps& ya, const AxisTaps& xa, long long W,
                                               double cval) {
    Corners t;
    for (int k = 0; k < 4; ++k) { t.i[k] = 0; t.w[k] = 0.0; }
    t.bias = 0.0;
    t.empty = true;
    if (!(ya.ok && xa.ok)) {
        t.bias = cval;
        return t;
    }
    long long y_low = ya.i_low, y_high = ya.i_high, x_low = xa.i_low, x_high = xa.i_high;
    const double ly = ya.l, hy = ya.h, lx = xa.l, hx = xa.h;
    if ((y_low < 0 || x_low < 0) && y_low == y_high && x_low == x_high && hy == 0.0
        && hx == 0.0) {
        // one tap outside (order 0): cval itself, as scipy reads one pixel (the weight-0
        // corners would add 0 * cval, NaN for an infinite cval)
        t.bias = cval;
        return t;
    }
    const long long yi[4] = {y_low, y_low, y_high, y_high};
    const long long xi[4] = {x_low, x_high, x_low, x_high};
    const double w[4] = {ly * lx, ly * hx, hy * lx, hy * hx};
    double bias = 0.0;
    double wk[4];
    for (int k = 0; k < 4; ++k) {
        if (yi[k] < 0 || xi[k] < 0) {  // an outside corner moves its weight to bias
            wk[k] = 0.0;
            bias = bias + cval * w[k];
        } else {
            wk[k] = w[k];
        }
    }
    t.bias = bias;
    if ((y_low < 0 && y_high < 0) || (x_low < 0 && x_high < 0)) return t;
    // an outside tap borrows the other tap of its axis: every index is then a corner inside
    if (y_low < 0) y_low = y_high;
    if (y_high < 0) y_high = y_low;
    if (x_low < 0) x_low = x_high;
    if (x_high < 0) x_high = x_low;
    const long long r_low = y_low * W, r_high = y_high * W;
    t.i[0] = r_low + x_low;
    t.i[1] = r_low + x_high;
    t.i[2] = r_high + x_low;
    t.i[3] = r_high + x_high;
    for (int k = 0; k < 4; ++k) t.w[k] = wk[k];
    t.empty = false;
    return t;
}

// Derivative coefficients of a point's value with respect to y and x: the derivative of the
// bilinear interpolant of the cell from the four corner values the forward used (cval for
// corners outside), times the sign of the mode's coordinate mapping.
__device__ __forceinline__ Slopes corner_slopes(const AxisTaps& ya, const AxisTaps& xa, double cval) {
    double sy = ya.sign, sx = xa.sign;
    if (!(ya.ok && xa.ok)) { sy = 0.0; sx = 0.0; }
    const double ly = ya.l, hy = ya.h, lx = xa.l, hx = xa.h;
    const long long yi[4] = {ya.i_low, ya.i_low, ya.i_high, ya.i_high};
    const long long xi[4] = {xa.i_low, xa.i_high, xa.i_low, xa.i_high};
    // corner 00, 01, 10, 11: d/dy weights -lx, -hx, +lx, +hx; d/dx weights -ly, +ly, -hy, +hy
    const double dy[4] = {-sy * lx, -sy * hx, sy * lx, sy * hx};
    const double dx[4] = {-sx * ly, sx * ly, -sx * hy, sx * hy};
    Slopes s;
    s.cy = 0.0;
    s.cx = 0.0;
    for (int k = 0; k < 4; ++k) {
        if (yi[k] < 0 || xi[k] < 0) {
            s.ay[k] = 0.0; s.ax[k] = 0.0;
            if (dy[k] != 0.0) s.cy = s.cy + cval * dy[k];  // not 0 * cval (NaN if infinite)
            if (dx[k] != 0.0) s.cx = s.cx + cval * dx[k];
        } else {
            s.ay[k] = dy[k]; s.ax[k] = dx[k];
        }
    }
    return s;
}
