// Scalar and index types shared by every deformops CUDA kernel.
//
// Every kernel is a template over the storage type T (__half, __nv_bfloat16, float, double) and
// the index type I (int or long long; the host picks long long when any element count exceeds
// 2^31 - 1 less 1024, so that strided loops such as e += blockDim.x cannot wrap around). Half
// types are loaded into float and accumulate in float (acc_t); double stays double. Coordinate
// arithmetic (mode mapping, floor, weights) is done in double, as on the CPU.
#pragma once

#define DEFORMOPS_THREADS 256

// Boundary mode codes: deformops/_modes.py.
#define MODE_CONSTANT 0
#define MODE_GRID_CONSTANT 1
#define MODE_NEAREST 2
#define MODE_REFLECT 3
#define MODE_MIRROR 4
#define MODE_WRAP 5
#define MODE_GRID_WRAP 6

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

// float -> double keeping subnormals: CuPy compiles with -ftz=true (after any option of ours),
// under which a plain conversion is cvt.ftz.f64.f32 and a coordinate of -1e-40 would become -0,
// inside the image where the CPU and scipy see it outside. Coordinates go through this.
__device__ __forceinline__ double to_double(float v) {
#ifdef __CUDA_ARCH__
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(v));
  return r;
#else
  return (double)v;
#endif
}
__device__ __forceinline__ double to_double(__half v) { return to_double(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) {
  return to_double(__bfloat162float(v));
}
__device__ __forceinline__ double to_double(double v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// Grid-stride loop over [0, total): the counter is 64-bit, so that the int path cannot overflow
// when it steps past the last element.
#define GRID_LOOP(t, total)                                                              \
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < (long long)(total); \
         t += (long long)blockDim.x * gridDim.x)

// Floor modulo (the result has the sign of p > 0), as Python's %.
__device__ __forceinline__ long long floor_mod(long long i, long long p) {
    long long r = i % p;
    return r < 0 ? r + p : r;
}
