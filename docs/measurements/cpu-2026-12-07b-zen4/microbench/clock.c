// Zen 4 microbenchmark for docs/measurements/cpu-2026-12-07b-zen4/README.md (cycles assume 3.65 GHz,
// see clock.c): gcc -O2 -mavx512f -mavx512vl -mfma clock.c -o a && ./a
#include <stdio.h>
#include <time.h>
int main(){ struct timespec a,b; long n=2000000000L; long x=0;
clock_gettime(CLOCK_MONOTONIC,&a);
for(long i=0;i<n;i++){ __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x)); }
clock_gettime(CLOCK_MONOTONIC,&b);
double t=(b.tv_sec-a.tv_sec)+(b.tv_nsec-a.tv_nsec)*1e-9; printf("%.2f GHz\n", 4.0*n/t/1e9); return 0;}
