// Zen 4 microbenchmark for docs/measurements/cpu-2026-12-07b-zen4/README.md (cycles assume 3.65 GHz,
// see clock.c): gcc -O2 -mavx512f -mavx512vl -mfma broadcast_fma.c -o a && ./a
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
float buf[4096] __attribute__((aligned(64)));
#define N 20000000L
// 8 independent FMA chains; OPERAND(p) forms the K-side operand from a pointer (the only
// thing the four variants change)
#define CHAINS(NAME, OPERAND)                                                          \
  __attribute__((noinline)) __m512 NAME(const float* k, __m512 q) {                  \
    __m512 a[8];                                                                      \
    for (int g = 0; g < 8; g++) a[g] = _mm512_setzero_ps();                           \
    for (long i = 0; i < N; i++) {                                                    \
      const float* p = k + (i & 7) * 2;                                               \
      _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++)                             \
        a[g] = _mm512_fmadd_ps(q, OPERAND(p + 20 * g), a[g]);                         \
    }                                                                                 \
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];                     \
  }
static inline __m512 b32(const float* p) { return _mm512_set1_ps(*p); }  // embedded {1to16}
static inline __m512 b64(const float* p) {  // explicit vbroadcastsd
  double d;
  memcpy(&d, p, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(d));
}
static inline __m512 b128(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
CHAINS(fa, b32)
CHAINS(fb, b64)
CHAINS(fc, b128)
CHAINS(fd, _mm512_loadu_ps)  // full unaligned loads
int main(){ for(int i=0;i<4096;i++)buf[i]=1e-3f*i; __m512 q=_mm512_set1_ps(1e-9f); float s=0;
  __m512 (*f[4])(const float*,__m512)={fa,fb,fc,fd}; const char*n[4]={"emb32","bcast64","bcast128","load"};
  for(int r=0;r<2;r++) for(int j=0;j<4;j++){double t=now(); __m512 x=f[j](buf,q); t=now()-t; s+=x[0];
    printf("%s %.3f cycles/FMA\n",n[j], t*3.65e9/(N*8.0));}
  printf("%g\n",s);}
