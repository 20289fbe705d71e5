#include "moekit/backend.h"

#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "core/gpu_hooks.h"
#include "moekit/error.h"
#ifdef MOEKIT_HAVE_GPU
#include "gpu/gpu_runtime.h"
#endif

namespace moekit {

const GpuHooks& gpu_hooks() {
#ifdef MOEKIT_HAVE_GPU
  static const GpuHooks hooks = gpu::make_hooks();
#else
  static const GpuHooks hooks;
#endif
  return hooks;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    // AVX512_BF16: cpuid leaf 7 subleaf 1, EAX bit 5 (the OS's zmm state is checked by avx512).
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    f.avx512_bf16 =
        f.avx512 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 5)) != 0;
#if defined(__linux__) && defined(__x86_64__)
    // AMX: cpuid leaf 7 subleaf 0, EDX bits 22 (AMX-BF16) and 24 (AMX-TILE); XCR0 bits 17 and 18
    // (tile config and data state, enabled by the OS); then Linux grants the tile data state to a
    // process that asks (arch_prctl ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18), else
    // the first tile instruction faults.
    const bool amx_cpuid = f.avx512_bf16 && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 &&
                           (edx & (1u << 22)) != 0 && (edx & (1u << 24)) != 0;
    if (amx_cpuid) {
      unsigned xcr0_low = 0, xcr0_high = 0;
      __asm__("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
      constexpr unsigned kTileState = (1u << 17) | (1u << 18);
      constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
      f.amx_bf16 = (xcr0_low & kTileState) == kTileState &&
                   syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }
#endif
#endif
    return f;
  }();
  return features;
}

namespace {
int gpu_count() {
  const GpuHooks& gpu = gpu_hooks();
  if (!gpu.device_count) return 0;
  try {
    return gpu.device_count();
  } catch (const Error&) {
    return 0;  // a driver without a device: the backend is simply absent
  }
}
}  // namespace

std::vector<BackendInfo> backends() {
  std::vector<BackendInfo> out;
  out.push_back({Backend::reference, "reference", "scalar definitional code (the oracle)"});
  const CpuFeatures& f = cpu_features();
  std::string isa = f.avx512 ? "avx512 avx2 fma f16c" : f.avx2 ? "avx2 fma f16c" : "scalar";
  if (f.avx512_bf16) isa = "avx512_bf16 " + isa;
  if (f.amx_bf16) isa = "amx_bf16 " + isa;
  out.push_back(
      {Backend::cpu, "cpu", isa + ", " + std::to_string(omp_get_max_threads()) + " threads"});
  const int n = gpu_count();
  for (int d = 0; d < n && d < 1; ++d)
    out.push_back({Backend::gpu, "gpu", gpu_hooks().describe(d)});
  return out;
}

bool backend_available(Backend backend) {
  if (backend == Backend::gpu) return gpu_count() > 0;
  return true;
}

std::string_view backend_name(Backend backend) {
  switch (backend) {
    case Backend::reference:
      return "reference";
    case Backend::cpu:
      return "cpu";
    case Backend::gpu:
      return "gpu";
  }
  return "?";
}

Backend parse_backend(std::string_view name) {
  if (name == "reference") return Backend::reference;
  if (name == "cpu") return Backend::cpu;
  if (name == "gpu") return Backend::gpu;
  fail("backend", "name", std::string(name), "is not a backend (reference, cpu or gpu)");
}

Backend fastest_backend() { return backend_available(Backend::gpu) ? Backend::gpu : Backend::cpu; }

}  // namespace moekit
