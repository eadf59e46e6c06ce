// Probe behind docs/benchmarks.md session 41: the AVX-512 panel kernel's loop (two panels, 1 or 6
// rows) over every product of SmolLM2-135M (30 layers and the vocabulary, f32 panels, two threads),
// without and with a software prefetch 16 or 32 steps ahead, interleaved in one process.
// Build and run: gcc -O3 -mavx512f -fopenmp benches/probes/panel_prefetch.c -o /tmp/pf && /tmp/pf
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
typedef struct {int out,in; float*w;} W;
static inline void tile(const float*x,int mr,int in,const float*p0,const float*p1,float*y,int outs,int pf){
  __m512 acc[8][2];
  for(int i=0;i<mr;i++){acc[i][0]=_mm512_setzero_ps();acc[i][1]=_mm512_setzero_ps();}
  for(int k=0;k<in;k++){
    if(pf){_mm_prefetch((const char*)(p0+(k+pf)*16),_MM_HINT_T0);_mm_prefetch((const char*)(p1+(k+pf)*16),_MM_HINT_T0);}
    __m512 w0=_mm512_loadu_ps(p0+k*16),w1=_mm512_loadu_ps(p1+k*16);
    for(int i=0;i<mr;i++){__m512 xk=_mm512_set1_ps(x[i*in+k]);acc[i][0]=_mm512_fmadd_ps(xk,w0,acc[i][0]);acc[i][1]=_mm512_fmadd_ps(xk,w1,acc[i][1]);}
  }
  for(int i=0;i<mr;i++){_mm512_storeu_ps(y+i*outs,acc[i][0]);_mm512_storeu_ps(y+i*outs+16,acc[i][1]);}
}
static void product(W*w,const float*x,int rows,float*y,int pf){
  int npan=w->out/16;
  #pragma omp parallel for schedule(dynamic,1)
  for(int t=0;t<npan;t+=8){
    for(int p=t;p<t+8&&p<npan;p+=2){
      const float*p0=w->w+(size_t)p*16*w->in,*p1=p0+16*w->in;
      switch(rows){case 1: tile(x,1,w->in,p0,p1,y+p*16,w->out,pf);break; default: tile(x,6,w->in,p0,p1,y+p*16,w->out,pf);}
    }
  }
}
int main(){
  int shapes[7][2]={{576,576},{192,576},{192,576},{576,576},{1536,576},{1536,576},{576,1536}};
  W ws[30*7+1]; int n=0;
  for(int l=0;l<30;l++)for(int s=0;s<7;s++){ws[n].out=shapes[s][0];ws[n].in=shapes[s][1];n++;}
  ws[n].out=49152;ws[n].in=576;n++;
  for(int i=0;i<n;i++){size_t sz=(size_t)ws[i].out*ws[i].in;ws[i].w=aligned_alloc(64,sz*4+8192);for(size_t j=0;j<sz;j++)ws[i].w[j]=(j%7)*0.01f;}
  float*x=aligned_alloc(64,6*1536*4);for(int i=0;i<6*1536;i++)x[i]=0.001f*i;
  float*y=aligned_alloc(64,6*49152*4);
  int pfs[3]={0,16,32}; double best[2][3], sum[2][3]; for(int a=0;a<2;a++)for(int b=0;b<3;b++){best[a][b]=1e9;sum[a][b]=0;}
  int reps=60;
  for(int r=0;r<reps;r++)for(int ri=0;ri<2;ri++)for(int pi=0;pi<3;pi++){
    double t0=now(); for(int i=0;i<n;i++) product(&ws[i],x,ri?6:1,y,pfs[pi]); double t=now()-t0;
    if(t<best[ri][pi])best[ri][pi]=t; sum[ri][pi]+=t;
  }
  for(int ri=0;ri<2;ri++)for(int pi=0;pi<3;pi++)printf("rows %d pf %2d min %.2f ms mean %.2f ms\n",ri?6:1,pfs[pi],best[ri][pi]*1e3,sum[ri][pi]/reps*1e3);
  printf("%f\n",y[5]);
}
