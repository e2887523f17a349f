// Zen 4 microbenchmark for docs/measurements/cpu-2026-12-07b-zen4/README.md (cycles assume 3.65 GHz,
// see clock.c): gcc -O2 -mavx512f -mavx512vl -mfma pv_pattern.c -o a && ./a
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
float buf[4096] __attribute__((aligned(64)));
#define N 5000000L
#define FMAE(acc, v, p) __asm__("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(v), "m"(*(p)))
#define FMAE4(acc, v, p) __asm__("vfmadd231ps %2%{1to4%}, %1, %0" : "+v"(acc) : "v"(v), "m"(*(p)))
// 9 queries x (2 zmm + 1 xmm) per key
__attribute__((noinline)) float fexp(const float* P, const float* V){
  __m512 a[9][2]; __m128 b[9];
  for(int g=0;g<9;g++){a[g][0]=a[g][1]=_mm512_setzero_ps(); b[g]=_mm_setzero_ps();}
  for(long i=0;i<N;i++){ const float* v=V+(i&15)*36; const float* p=P+(i&15)*16;
    __m512 v0=_mm512_loadu_ps(v), v1=_mm512_loadu_ps(v+16); __m128 v2=_mm_loadu_ps(v+32);
    #pragma GCC unroll 9
    for(int g=0;g<9;g++){ __m512 pj=_mm512_set1_ps(p[g]);
      a[g][0]=_mm512_fmadd_ps(pj,v0,a[g][0]); a[g][1]=_mm512_fmadd_ps(pj,v1,a[g][1]);
      b[g]=_mm_fmadd_ps(_mm512_castps512_ps128(pj),v2,b[g]); } }
  float s=0; for(int g=0;g<9;g++) s+=a[g][0][0]+a[g][1][1]+b[g][2]; return s;}
__attribute__((noinline)) float femb2(const float* P, const float* V){
  __m512 a0_0=_mm512_setzero_ps(),a0_1=_mm512_setzero_ps(),a1_0=_mm512_setzero_ps(),a1_1=_mm512_setzero_ps(),a2_0=_mm512_setzero_ps(),a2_1=_mm512_setzero_ps(),a3_0=_mm512_setzero_ps(),a3_1=_mm512_setzero_ps(),a4_0=_mm512_setzero_ps(),a4_1=_mm512_setzero_ps(),a5_0=_mm512_setzero_ps(),a5_1=_mm512_setzero_ps(),a6_0=_mm512_setzero_ps(),a6_1=_mm512_setzero_ps(),a7_0=_mm512_setzero_ps(),a7_1=_mm512_setzero_ps(),a8_0=_mm512_setzero_ps(),a8_1=_mm512_setzero_ps();
  __m128 b0=_mm_setzero_ps(),b1=_mm_setzero_ps(),b2=_mm_setzero_ps(),b3=_mm_setzero_ps(),b4=_mm_setzero_ps(),b5=_mm_setzero_ps(),b6=_mm_setzero_ps(),b7=_mm_setzero_ps(),b8=_mm_setzero_ps();
  for(long i=0;i<N;i++){ const float* v=V+(i&15)*36; const float* p=P+(i&15)*16;
    __m512 v0=_mm512_loadu_ps(v), v1=_mm512_loadu_ps(v+16); __m128 v2=_mm_loadu_ps(v+32);
    FMAE(a0_0,v0,p+0); FMAE(a0_1,v1,p+0); FMAE4(b0,v2,p+0);
    FMAE(a1_0,v0,p+1); FMAE(a1_1,v1,p+1); FMAE4(b1,v2,p+1);
    FMAE(a2_0,v0,p+2); FMAE(a2_1,v1,p+2); FMAE4(b2,v2,p+2);
    FMAE(a3_0,v0,p+3); FMAE(a3_1,v1,p+3); FMAE4(b3,v2,p+3);
    FMAE(a4_0,v0,p+4); FMAE(a4_1,v1,p+4); FMAE4(b4,v2,p+4);
    FMAE(a5_0,v0,p+5); FMAE(a5_1,v1,p+5); FMAE4(b5,v2,p+5);
    FMAE(a6_0,v0,p+6); FMAE(a6_1,v1,p+6); FMAE4(b6,v2,p+6);
    FMAE(a7_0,v0,p+7); FMAE(a7_1,v1,p+7); FMAE4(b7,v2,p+7);
    FMAE(a8_0,v0,p+8); FMAE(a8_1,v1,p+8); FMAE4(b8,v2,p+8);
  }
  float s=0; s+=a0_0[0]+a0_1[1]+b0[2]; s+=a1_0[0]+a1_1[1]+b1[2]; s+=a2_0[0]+a2_1[1]+b2[2]; s+=a3_0[0]+a3_1[1]+b3[2]; s+=a4_0[0]+a4_1[1]+b4[2]; s+=a5_0[0]+a5_1[1]+b5[2]; s+=a6_0[0]+a6_1[1]+b6[2]; s+=a7_0[0]+a7_1[1]+b7[2]; s+=a8_0[0]+a8_1[1]+b8[2]; return s;}
int main(){ for(int i=0;i<4096;i++)buf[i]=1e-6f*i; float s=0;
  for(int r=0;r<3;r++){ double t=now(); s+=fexp(buf,buf+1024); double t1=now(); s+=femb2(buf,buf+1024); double t2=now();
    printf("explicit %.2f  embedded %.2f cycles/key\n",(t1-t)*3.65e9/N,(t2-t1)*3.65e9/N);}
  printf("%g\n",s);}
