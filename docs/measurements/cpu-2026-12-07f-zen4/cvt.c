// fp16 -> fp32 (vcvtph2ps, 512- and 256-bit) and bf16 -> fp32 (shift) conversion into an L1
// buffer: cycles per 16 elements. gcc -O2 -mavx512f -mavx512vl -mavx512bw -mf16c cvt.c
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
__attribute__((noinline)) void cvt512(float* d, const unsigned short* s, long n){ for(long i=0;i<n;i+=16) _mm512_storeu_ps(d+i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s+i)))); }
__attribute__((noinline)) void cvt256(float* d, const unsigned short* s, long n){ for(long i=0;i<n;i+=8) _mm256_storeu_ps(d+i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s+i)))); }
__attribute__((noinline)) void cvtbf(float* d, const unsigned short* s, long n){ for(long i=0;i<n;i+=16) _mm512_storeu_ps(d+i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s+i))),16))); }
int main(){ long n=4608; int reps=200000; unsigned short*s=aligned_alloc(64,n*2); float*d=aligned_alloc(64,n*4); for(long i=0;i<n;i++)s[i]=0x3c00;
 double t=now(); for(int r=0;r<reps;r++) cvt512(d,s,n); printf("cvt512: %.2f cycles/16 elems\n",(now()-t)*3.66e9/(reps*(n/16.0)));
 t=now(); for(int r=0;r<reps;r++) cvt256(d,s,n); printf("cvt256: %.2f cycles/16 elems\n",(now()-t)*3.66e9/(reps*(n/16.0)));
 t=now(); for(int r=0;r<reps;r++) cvtbf(d,s,n); printf("bf16 shift: %.2f cycles/16 elems\n",(now()-t)*3.66e9/(reps*(n/16.0)));
 return d[5]>2; }
