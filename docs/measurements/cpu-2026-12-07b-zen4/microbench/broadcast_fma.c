// Zen 4 microbenchmark for docs/measurements/cpu-2026-12-07b-zen4/README.md (cycles assume 3.65 GHz,
// see clock.c): gcc -O2 -mavx512f -mavx512vl -mfma broadcast_fma.c -o a && ./a
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
float buf[4096] __attribute__((aligned(64)));
#define N 20000000L
__attribute__((noinline)) __m512 fa(const float* k, __m512 q){ // embedded 32-bit bcast
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
  for(long i=0;i<N;i++){ const float*p=k+(i&7)*2;
    a0=_mm512_fmadd_ps(q,_mm512_set1_ps(p[0]),a0); a1=_mm512_fmadd_ps(q,_mm512_set1_ps(p[20]),a1);
    a2=_mm512_fmadd_ps(q,_mm512_set1_ps(p[40]),a2); a3=_mm512_fmadd_ps(q,_mm512_set1_ps(p[60]),a3);
    a4=_mm512_fmadd_ps(q,_mm512_set1_ps(p[80]),a4); a5=_mm512_fmadd_ps(q,_mm512_set1_ps(p[100]),a5);
    a6=_mm512_fmadd_ps(q,_mm512_set1_ps(p[120]),a6); a7=_mm512_fmadd_ps(q,_mm512_set1_ps(p[140]),a7);}
  return a0+a1+a2+a3+a4+a5+a6+a7;}
static inline __m512 b64(const float*p){double d;memcpy(&d,p,8);return _mm512_castpd_ps(_mm512_set1_pd(d));}
__attribute__((noinline)) __m512 fb(const float* k, __m512 q){ // explicit 64-bit bcast
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
  for(long i=0;i<N;i++){ const float*p=k+(i&7)*2;
    a0=_mm512_fmadd_ps(q,b64(p),a0); a1=_mm512_fmadd_ps(q,b64(p+20),a1);
    a2=_mm512_fmadd_ps(q,b64(p+40),a2); a3=_mm512_fmadd_ps(q,b64(p+60),a3);
    a4=_mm512_fmadd_ps(q,b64(p+80),a4); a5=_mm512_fmadd_ps(q,b64(p+100),a5);
    a6=_mm512_fmadd_ps(q,b64(p+120),a6); a7=_mm512_fmadd_ps(q,b64(p+140),a7);}
  return a0+a1+a2+a3+a4+a5+a6+a7;}
static inline __m512 b128(const float*p){return _mm512_broadcast_f32x4(_mm_loadu_ps(p));}
__attribute__((noinline)) __m512 fc(const float* k, __m512 q){ // 128-bit bcast
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
  for(long i=0;i<N;i++){ const float*p=k+(i&7)*2;
    a0=_mm512_fmadd_ps(q,b128(p),a0); a1=_mm512_fmadd_ps(q,b128(p+20),a1);
    a2=_mm512_fmadd_ps(q,b128(p+40),a2); a3=_mm512_fmadd_ps(q,b128(p+60),a3);
    a4=_mm512_fmadd_ps(q,b128(p+80),a4); a5=_mm512_fmadd_ps(q,b128(p+100),a5);
    a6=_mm512_fmadd_ps(q,b128(p+120),a6); a7=_mm512_fmadd_ps(q,b128(p+140),a7);}
  return a0+a1+a2+a3+a4+a5+a6+a7;}
__attribute__((noinline)) __m512 fd(const float* k, __m512 q){ // full loads
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
  for(long i=0;i<N;i++){ const float*p=k+(i&7)*2;
    a0=_mm512_fmadd_ps(q,_mm512_loadu_ps(p),a0); a1=_mm512_fmadd_ps(q,_mm512_loadu_ps(p+20),a1);
    a2=_mm512_fmadd_ps(q,_mm512_loadu_ps(p+40),a2); a3=_mm512_fmadd_ps(q,_mm512_loadu_ps(p+60),a3);
    a4=_mm512_fmadd_ps(q,_mm512_loadu_ps(p+80),a4); a5=_mm512_fmadd_ps(q,_mm512_loadu_ps(p+100),a5);
    a6=_mm512_fmadd_ps(q,_mm512_loadu_ps(p+120),a6); a7=_mm512_fmadd_ps(q,_mm512_loadu_ps(p+140),a7);}
  return a0+a1+a2+a3+a4+a5+a6+a7;}
int main(){ for(int i=0;i<4096;i++)buf[i]=1e-3f*i; __m512 q=_mm512_set1_ps(1e-9f); float s=0;
  __m512 (*f[4])(const float*,__m512)={fa,fb,fc,fd}; const char*n[4]={"emb32","bcast64","bcast128","load"};
  for(int r=0;r<2;r++) for(int j=0;j<4;j++){double t=now(); __m512 x=f[j](buf,q); t=now()-t; s+=x[0];
    printf("%s %.3f cycles/FMA\n",n[j], t*3.65e9/(N*8.0));}
  printf("%g\n",s);}
