#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
float buf[4096] __attribute__((aligned(64)));
int main(){
  for(int i=0;i<4096;i++) buf[i]=1e-3f*(i%7);
  long n=20000000;
  __m256 a0,a1,a2,a3,a4,a5,a6,a7; a0=a1=a2=a3=a4=a5=a6=a7=_mm256_set1_ps(0.f);
  __m256 q=_mm256_set1_ps(0.5f);
  double t0=now();
  for(long i=0;i<n;i++){
    const float* p = buf + (i & 255) * 8;
    __asm__ volatile(
      "vfmadd231ps 0(%[p])%{1to8%}, %[q], %[a0]\n\t"
      "vfmadd231ps 4(%[p])%{1to8%}, %[q], %[a1]\n\t"
      "vfmadd231ps 8(%[p])%{1to8%}, %[q], %[a2]\n\t"
      "vfmadd231ps 12(%[p])%{1to8%}, %[q], %[a3]\n\t"
      "vfmadd231ps 16(%[p])%{1to8%}, %[q], %[a4]\n\t"
      "vfmadd231ps 20(%[p])%{1to8%}, %[q], %[a5]\n\t"
      "vfmadd231ps 24(%[p])%{1to8%}, %[q], %[a6]\n\t"
      "vfmadd231ps 28(%[p])%{1to8%}, %[q], %[a7]\n\t"
      : [a0]"+v"(a0),[a1]"+v"(a1),[a2]"+v"(a2),[a3]"+v"(a3),[a4]"+v"(a4),[a5]"+v"(a5),[a6]"+v"(a6),[a7]"+v"(a7) : [p]"r"(p),[q]"v"(q));
  }
  double s=now()-t0; printf("embedded-broadcast FMA: %.2f cycles per FMA (3.66GHz)\n", s*3.66e9/(n*8.0));
  t0=now();
  for(long i=0;i<n;i++){
    const float* p = buf + (i & 255) * 8;
    __asm__ volatile(
      "vfmadd231ps %[q], %[q], %[a0]\n\t" "vfmadd231ps %[q], %[q], %[a1]\n\t" "vfmadd231ps %[q], %[q], %[a2]\n\t" "vfmadd231ps %[q], %[q], %[a3]\n\t"
      "vfmadd231ps %[q], %[q], %[a4]\n\t" "vfmadd231ps %[q], %[q], %[a5]\n\t" "vfmadd231ps %[q], %[q], %[a6]\n\t" "vfmadd231ps %[q], %[q], %[a7]\n\t"
      : [a0]"+v"(a0),[a1]"+v"(a1),[a2]"+v"(a2),[a3]"+v"(a3),[a4]"+v"(a4),[a5]"+v"(a5),[a6]"+v"(a6),[a7]"+v"(a7) : [p]"r"(p),[q]"v"(q));
  }
  s=now()-t0; printf("register FMA: %.2f cycles per FMA\n", s*3.66e9/(n*8.0));
  t0=now();
  for(long i=0;i<n;i++){
    const float* p = buf + (i & 255) * 8;
    __asm__ volatile(
      "vfmadd231ps 0(%[p]), %[q], %[a0]\n\t" "vfmadd231ps 32(%[p]), %[q], %[a1]\n\t" "vfmadd231ps 64(%[p]), %[q], %[a2]\n\t" "vfmadd231ps 96(%[p]), %[q], %[a3]\n\t"
      "vfmadd231ps 128(%[p]), %[q], %[a4]\n\t" "vfmadd231ps 160(%[p]), %[q], %[a5]\n\t" "vfmadd231ps 192(%[p]), %[q], %[a6]\n\t" "vfmadd231ps 224(%[p]), %[q], %[a7]\n\t"
      : [a0]"+v"(a0),[a1]"+v"(a1),[a2]"+v"(a2),[a3]"+v"(a3),[a4]"+v"(a4),[a5]"+v"(a5),[a6]"+v"(a6),[a7]"+v"(a7) : [p]"r"(p),[q]"v"(q));
  }
  s=now()-t0; printf("full-load FMA: %.2f cycles per FMA\n", s*3.66e9/(n*8.0));
  float r=0; __m256 x=a0+a1+a2+a3+a4+a5+a6+a7; r=x[0]; printf("%g\n", r);
}
