// The q8 score loop (score_q8) alone, K in L1: cycles per key at 3.66 GHz.
// gcc -O3 -mavx512f -mavx512vl -mfma -mavx2 -DG=8 -DSPLIT=0 sq2.c && ./a.out 256 20000
// G: keys per group; SPLIT=1: two accumulator sets over even / odd head dims.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld8(const float*p){v8 v; __builtin_memcpy(&v,p,32); return v;}
#ifndef G
#define G 8
#endif
__attribute__((noinline)) v8 score(const float* qt, const float* kb, const int* koff, long Dk, float scale, float* out, v8 mx, long nk){
  for (long j=0;j+G<=nk;j+=G){
    v8 acc[G], acc2[G]; const float* kr[G];
    for(int g=0;g<G;g++){acc[g]=(v8){};acc2[g]=(v8){};kr[g]=kb+koff[j+g];}
#if SPLIT
    long d=0;
    for(;d+2<=Dk;d+=2){ v8 qv=ld8(qt+d*8), qw=ld8(qt+d*8+8); for(int g=0;g<G;g++){ acc[g]+= (kr[g][d]-(v8){})*qv; acc2[g]+= (kr[g][d+1]-(v8){})*qw;} }
    for(;d<Dk;d++){ v8 qv=ld8(qt+d*8); for(int g=0;g<G;g++) acc[g]+= (kr[g][d]-(v8){})*qv; }
    for(int g=0;g<G;g++) acc[g]+=acc2[g];
#else
    for(long d=0;d<Dk;d++){ v8 qv=ld8(qt+d*8); for(int g=0;g<G;g++) acc[g]+= (kr[g][d]-(v8){})*qv; }
#endif
    for(int g=0;g<G;g++){ v8 s=acc[g]*scale; s=s+0.0f*s; __builtin_memcpy(out+(j+g)*8,&s,32); mx = (v8)_mm256_max_ps((__m256)mx,(__m256)s); }
  }
  return mx;
}
int main(int argc,char**argv){
  long Dk=18, nk=atol(argv[1]); int reps=atoi(argv[2]);
  float*k=aligned_alloc(64,nk*Dk*4+64); float*qt=aligned_alloc(64,Dk*8*4); float*out=aligned_alloc(64,nk*8*4); int*koff=malloc(nk*4);
  for(long i=0;i<nk*Dk;i++)k[i]=(i%13)*0.01f; for(long i=0;i<Dk*8;i++)qt[i]=0.1f; for(long i=0;i<nk;i++)koff[i]=i*Dk;
  v8 mx={}; double t0=now();
  for(int r=0;r<reps;r++) mx=score(qt,k,koff,Dk,0.2f,out,mx,nk);
  double s=now()-t0; printf("G=%d SPLIT=%d nk=%ld: %.2f cycles per key %g\n", G, SPLIT, nk, s*3.66e9/((double)reps*nk), mx[0]);
}
