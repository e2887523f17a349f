// Zen 4 microbenchmark for docs/measurements/cpu-2026-12-07b-zen4/README.md (cycles assume 3.65 GHz,
// see clock.c): gcc -O2 -mavx512f -mavx512vl -mfma score_layouts.c -o a && ./a
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
float K[64*18+64] __attribute__((aligned(64)));
float Q[18*16] __attribute__((aligned(64)));
float Qs[24] __attribute__((aligned(64)));
float out[64*16] __attribute__((aligned(64)));
#define REP 200000
// old: 9 queries in zmm lanes, 8 keys per group, embedded broadcasts
__attribute__((noinline)) void fold(void){
  for(int r=0;r<REP;r++) for(int j=0;j<64;j+=8){
    __m512 acc[8]; for(int g=0;g<8;g++) acc[g]=_mm512_setzero_ps();
    for(int d=0;d<18;d++){ __m512 qv=_mm512_load_ps(Q+d*16);
      for(int g=0;g<8;g++) acc[g]=_mm512_fmadd_ps(_mm512_set1_ps(K[(j+g)*18+d]),qv,acc[g]);}
    for(int g=0;g<8;g++) _mm512_store_ps(out+(j+g)*16,acc[g]);
  }}
// new: 8 queries in ymm lanes + the 9th by dims-lanes dots
__attribute__((noinline)) void fnew(void){
  for(int r=0;r<REP;r++) for(int j=0;j<64;j+=8){
    __m256 acc[8]; for(int g=0;g<8;g++) acc[g]=_mm256_setzero_ps();
    for(int d=0;d<18;d++){ __m256 qv=_mm256_load_ps(Q+d*16);
      for(int g=0;g<8;g++) acc[g]=_mm256_fmadd_ps(_mm256_set1_ps(K[(j+g)*18+d]),qv,acc[g]);}
    for(int g=0;g<8;g++) _mm256_store_ps(out+(j+g)*16,acc[g]);
    __m256 s[8];
    const __m256 q0=_mm256_load_ps(Qs), q1=_mm256_load_ps(Qs+8), q2=_mm256_load_ps(Qs+16);
    for(int g=0;g<8;g++){ const float* k=K+(j+g)*18;
      __m256 a=_mm256_mul_ps(_mm256_loadu_ps(k),q0); a=_mm256_fmadd_ps(_mm256_loadu_ps(k+8),q1,a);
      a=_mm256_fmadd_ps(_mm256_maskz_loadu_ps(3,k+16),q2,a); s[g]=a;}
    const __m256 h01=_mm256_hadd_ps(s[0],s[1]),h23=_mm256_hadd_ps(s[2],s[3]),h45=_mm256_hadd_ps(s[4],s[5]),h67=_mm256_hadd_ps(s[6],s[7]);
    const __m256 x=_mm256_hadd_ps(h01,h23),y=_mm256_hadd_ps(h45,h67);
    const __m256 t=_mm256_add_ps(_mm256_permute2f128_ps(x,y,0x20),_mm256_permute2f128_ps(x,y,0x31));
    _mm256_store_ps(out+j*16+8,t);  /* stand-in for the 9th query's scores */
  }}
__attribute__((noinline)) void fnew8(void){  // 8 queries only (ymm), no 9th
  for(int r=0;r<REP;r++) for(int j=0;j<64;j+=8){
    __m256 acc[8]; for(int g=0;g<8;g++) acc[g]=_mm256_setzero_ps();
    for(int d=0;d<18;d++){ __m256 qv=_mm256_load_ps(Q+d*16);
      for(int g=0;g<8;g++) acc[g]=_mm256_fmadd_ps(_mm256_set1_ps(K[(j+g)*18+d]),qv,acc[g]);}
    for(int g=0;g<8;g++) _mm256_store_ps(out+(j+g)*16,acc[g]);
  }}
int main(){ for(int i=0;i<64*18+64;i++)K[i]=1e-3f*(i%97); for(int i=0;i<18*16;i++)Q[i]=1e-2f*(i%13); for(int i=0;i<24;i++)Qs[i]=i<18?0.1f:0;
  for(int it=0;it<3;it++){ double t0=now(); fold(); double t1=now(); fnew(); double t2=now(); fnew8(); double t3=now();
   double n=REP*64.0; printf("old %.2f  new(8 ymm + 1 dot) %.2f  8 ymm only %.2f cycles/key\n",(t1-t0)*3.65e9/n,(t2-t1)*3.65e9/n,(t3-t2)*3.65e9/n);}
  printf("%g\n",out[5]);}
