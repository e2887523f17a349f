#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
#define BODY(T,F) a0=F(a0,b,c);a1=F(a1,b,c);a2=F(a2,b,c);a3=F(a3,b,c);a4=F(a4,b,c);a5=F(a5,b,c);a6=F(a6,b,c);a7=F(a7,b,c);a8=F(a8,b,c);a9=F(a9,b,c);
int main(){
  long n=100000000;
  { __m256 a0,a1,a2,a3,a4,a5,a6,a7,a8,a9; a0=a1=a2=a3=a4=a5=a6=a7=a8=a9=_mm256_set1_ps(1.f); __m256 b=_mm256_set1_ps(0.999999f), c=_mm256_set1_ps(1e-7f);
    double t0=now(); for(long i=0;i<n;i++){ BODY(__m256,_mm256_fmadd_ps) __asm__ volatile("":"+x"(a0),"+x"(a1),"+x"(a2),"+x"(a3),"+x"(a4),"+x"(a5),"+x"(a6),"+x"(a7),"+x"(a8),"+x"(a9)); }
    double s=now()-t0; printf("ymm FMA/cycle at 3.66GHz: %.2f %g\n", n*10/s/3.66e9, a0[0]+a9[0]); }
  { __m512 a0,a1,a2,a3,a4,a5,a6,a7,a8,a9; a0=a1=a2=a3=a4=a5=a6=a7=a8=a9=_mm512_set1_ps(1.f); __m512 b=_mm512_set1_ps(0.999999f), c=_mm512_set1_ps(1e-7f);
    double t0=now(); for(long i=0;i<n;i++){ BODY(__m512,_mm512_fmadd_ps) __asm__ volatile("":"+v"(a0),"+v"(a1),"+v"(a2),"+v"(a3),"+v"(a4),"+v"(a5),"+v"(a6),"+v"(a7),"+v"(a8),"+v"(a9)); }
    double s=now()-t0; printf("zmm FMA/cycle: %.2f %g\n", n*10/s/3.66e9, a0[0]+a9[0]); }
  { __m128 a0,a1,a2,a3,a4,a5,a6,a7,a8,a9; a0=a1=a2=a3=a4=a5=a6=a7=a8=a9=_mm_set1_ps(1.f); __m128 b=_mm_set1_ps(0.999999f), c=_mm_set1_ps(1e-7f);
    double t0=now(); for(long i=0;i<n;i++){ BODY(__m128,_mm_fmadd_ps) __asm__ volatile("":"+x"(a0),"+x"(a1),"+x"(a2),"+x"(a3),"+x"(a4),"+x"(a5),"+x"(a6),"+x"(a7),"+x"(a8),"+x"(a9)); }
    double s=now()-t0; printf("xmm FMA/cycle: %.2f %g\n", n*10/s/3.66e9, a0[0]+a9[0]); }
}
