// One core's peak multiply-add rate: 12 independent 16-float AVX-512 accumulators in
// registers, no loads (the ceiling of any float32 product on the core), and the clock seen by
// a chain of dependent scalar adds. Run one copy per core at once to see whether the VM's
// cores share their multiply-add units with each other or with a neighbour:
//   g++ -O2 -march=native -o /tmp/fma_peak benchmarks/fma_peak.cc
//   taskset -c 0 /tmp/fma_peak 3 & taskset -c 1 /tmp/fma_peak 3; wait
// Numbers from the 2-core Xeon VM: benchmarks/cpu-notes.md (session of 2026-11-27 18:30).
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
double zmm(long iters) {
  auto t0 = std::chrono::steady_clock::now();
  asm volatile(
    "vxorps %%zmm0,%%zmm0,%%zmm0\n vxorps %%zmm1,%%zmm1,%%zmm1\n vxorps %%zmm2,%%zmm2,%%zmm2\n"
    "vxorps %%zmm3,%%zmm3,%%zmm3\n vxorps %%zmm4,%%zmm4,%%zmm4\n vxorps %%zmm5,%%zmm5,%%zmm5\n"
    "vxorps %%zmm6,%%zmm6,%%zmm6\n vxorps %%zmm7,%%zmm7,%%zmm7\n vxorps %%zmm8,%%zmm8,%%zmm8\n"
    "vxorps %%zmm9,%%zmm9,%%zmm9\n vxorps %%zmm10,%%zmm10,%%zmm10\n vxorps %%zmm11,%%zmm11,%%zmm11\n"
    "1:\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm0\n vfmadd231ps %%zmm14,%%zmm15,%%zmm1\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm2\n vfmadd231ps %%zmm14,%%zmm15,%%zmm3\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm4\n vfmadd231ps %%zmm14,%%zmm15,%%zmm5\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm6\n vfmadd231ps %%zmm14,%%zmm15,%%zmm7\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm8\n vfmadd231ps %%zmm14,%%zmm15,%%zmm9\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm10\n vfmadd231ps %%zmm14,%%zmm15,%%zmm11\n"
    "dec %0\n jnz 1b\n"
    : "+r"(iters) :: "zmm0","zmm1","zmm2","zmm3","zmm4","zmm5","zmm6","zmm7","zmm8","zmm9","zmm10","zmm11","cc");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
double scalar(long n) {
  auto t0 = std::chrono::steady_clock::now();
  asm volatile("1:\n add $1, %%rax\n add $1, %%rax\n add $1, %%rax\n add $1, %%rax\n sub $4, %0\n jnz 1b\n" : "+r"(n) :: "rax","cc");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
int main(int argc, char** argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 10;
  for (int r = 0; r < reps; ++r) {
    long it = 20000000;
    double s = zmm(it);
    double g = 2.0 * 16 * 12 * it / s / 1e9;
    long n = 400000000;
    double s2 = scalar(n);
    double s3 = zmm(it);
    printf("zmm %.1f GFLOP/s (%.2f FMA/ns), scalar add chain %.2f GHz, zmm again %.1f\n", g, 12.0*it/s/1e9, n / s2 / 1e9, 2.0*16*12*it/s3/1e9);
  }
}
