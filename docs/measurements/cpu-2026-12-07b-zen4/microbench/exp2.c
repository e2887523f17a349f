// Zen 4 microbenchmark for docs/measurements/cpu-2026-12-07b-zen4/README.md (cycles assume 3.65 GHz,
// see clock.c): gcc -O2 -mavx512f -mavx512vl -mfma exp2.c -o a && ./a
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
float S[64*16] __attribute__((aligned(64)));
#define REP 400000
static inline __m512 poly(__m512 f){
  __m512 p=_mm512_set1_ps(1.5403530393381606e-4f);
  p=_mm512_fmadd_ps(p,f,_mm512_set1_ps(1.3333558146428443e-3f));
  p=_mm512_fmadd_ps(p,f,_mm512_set1_ps(9.618129107628477e-3f));
  p=_mm512_fmadd_ps(p,f,_mm512_set1_ps(5.550410866482158e-2f));
  p=_mm512_fmadd_ps(p,f,_mm512_set1_ps(0.2402265069591007f));
  p=_mm512_fmadd_ps(p,f,_mm512_set1_ps(0.6931471805599453f));
  p=_mm512_fmadd_ps(p,f,_mm512_set1_ps(1.0f)); return p;}
static inline __m512 e_scalef(__m512 x){
  const __m512 xv=_mm512_min_ps(_mm512_set1_ps(127.0f),x);
  const __m512 n=_mm512_roundscale_ps(xv,_MM_FROUND_TO_NEAREST_INT|_MM_FROUND_NO_EXC);
  const __m512 p=poly(_mm512_sub_ps(xv,n));
  const __mmask16 keep=_mm512_cmp_ps_mask(x,_mm512_set1_ps(-126.0f),_CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep,p,n);}
static inline __m512 e_int(__m512 x){  // integer exponent build
  const __m512 xv=_mm512_min_ps(_mm512_set1_ps(127.0f),_mm512_max_ps(x,_mm512_set1_ps(-127.0f)));
  const __m512 n=_mm512_roundscale_ps(xv,_MM_FROUND_TO_NEAREST_INT|_MM_FROUND_NO_EXC);
  const __m512 p=poly(_mm512_sub_ps(xv,n));
  const __m512i e=_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n),_mm512_set1_epi32(127)),23);
  const __mmask16 keep=_mm512_cmp_ps_mask(x,_mm512_set1_ps(-126.0f),_CMP_NLT_UQ);
  return _mm512_maskz_mul_ps(keep,p,_mm512_castsi512_ps(e));}
#define LOOP(F) for(int r=0;r<REP;r++){ __m512 m=_mm512_set1_ps(0.5f), l=_mm512_set1_ps(1.4426950408889634f), a0=_mm512_setzero_ps(),a1=a0; \
  for(int j=0;j<64;j+=2){ __m512 p0=F(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(S+j*16),m),l)); __m512 p1=F(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(S+j*16+16),m),l)); \
   _mm512_store_ps(S+j*16,p0); _mm512_store_ps(S+j*16+16,p1); a0=_mm512_add_ps(a0,p0); a1=_mm512_add_ps(a1,p1);} acc=_mm512_add_ps(acc,_mm512_add_ps(a0,a1)); \
   for(int j=0;j<64*16;j+=16) _mm512_store_ps(S+j,_mm512_set1_ps(-0.3f*(j%7))); }
__attribute__((noinline)) float fa(void){ __m512 acc=_mm512_setzero_ps(); LOOP(e_scalef) return acc[0];}
__attribute__((noinline)) float fb(void){ __m512 acc=_mm512_setzero_ps(); LOOP(e_int) return acc[0];}
__attribute__((noinline)) float fc(void){ __m512 acc=_mm512_setzero_ps(); for(int r=0;r<REP;r++){for(int j=0;j<64*16;j+=16) _mm512_store_ps(S+j,_mm512_set1_ps(-0.3f*(j%7)));} return acc[0];}
int main(){ float s=0; for(int it=0;it<3;it++){ double t0=now(); s+=fa(); double t1=now(); s+=fb(); double t2=now(); s+=fc(); double t3=now();
  double n=REP*64.0; printf("scalef %.2f  int %.2f  refill-only %.2f cycles/vector\n",(t1-t0)*3.65e9/n,(t2-t1)*3.65e9/n,(t3-t2)*3.65e9/n);} printf("%g\n",s);}
