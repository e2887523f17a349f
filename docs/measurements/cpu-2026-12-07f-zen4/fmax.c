// Register FMA rate (12 independent 256-bit chains) on one vCPU and on both at once:
// whether the VM's two vCPUs are separate cores (SMT siblings would halve the rate).
// gcc -O2 -mavx2 -mfma -mavx512f -mavx512vl fmax.c && taskset -c 0 ./a.out & taskset -c 1 ./a.out
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  long n=200000000;
  __m256 a0,a1,a2,a3,a4,a5,a6,a7,a8,a9,a10,a11; a0=a1=a2=a3=a4=a5=a6=a7=a8=a9=a10=a11=_mm256_set1_ps(0.f);
  __m256 q=_mm256_set1_ps(0.5f);
  double t0=now();
  for(long i=0;i<n;i++){
    __asm__ volatile(
      "vfmadd231ps %[q], %[q], %[a0]\n\t" "vfmadd231ps %[q], %[q], %[a1]\n\t" "vfmadd231ps %[q], %[q], %[a2]\n\t" "vfmadd231ps %[q], %[q], %[a3]\n\t"
      "vfmadd231ps %[q], %[q], %[a4]\n\t" "vfmadd231ps %[q], %[q], %[a5]\n\t" "vfmadd231ps %[q], %[q], %[a6]\n\t" "vfmadd231ps %[q], %[q], %[a7]\n\t"
      "vfmadd231ps %[q], %[q], %[a8]\n\t" "vfmadd231ps %[q], %[q], %[a9]\n\t" "vfmadd231ps %[q], %[q], %[a10]\n\t" "vfmadd231ps %[q], %[q], %[a11]\n\t"
      : [a0]"+v"(a0),[a1]"+v"(a1),[a2]"+v"(a2),[a3]"+v"(a3),[a4]"+v"(a4),[a5]"+v"(a5),[a6]"+v"(a6),[a7]"+v"(a7),[a8]"+v"(a8),[a9]"+v"(a9),[a10]"+v"(a10),[a11]"+v"(a11) : [q]"v"(q));
  }
  double s=now()-t0; printf("%.3f ns per FMA -> %.2f FMA/ns\n", s*1e9/(n*12.0), n*12.0/(s*1e9));
  __m256 x=a0+a1+a2+a3+a4+a5+a6+a7+a8+a9+a10+a11; return (int)x[0];
}
