// CUDA device discovery for cudaInfo(). Host code only: it must work (and report the
// reason) on machines with no GPU or no driver, where the static runtime returns
// an error from the first call instead of failing to load.
#include "device_probe.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

namespace {

void set_error(MoeCudaProbe* out, const char* what, cudaError_t err) {
  std::snprintf(out->error, sizeof(out->error), "%s: %s (%s)", what, cudaGetErrorString(err),
                cudaGetErrorName(err));
}

}  // namespace

extern "C" void moe_cuda_probe(MoeCudaProbe* out) {
  std::memset(out, 0, sizeof(*out));
  out->compiled = 1;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    set_error(out, "cudaGetDeviceCount", err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return;
  }
  const int listed = count < MOE_CUDA_MAX_DEVICES ? count : MOE_CUDA_MAX_DEVICES;
  for (int i = 0; i < listed; ++i) {
    cudaDeviceProp prop;
    err = cudaGetDeviceProperties(&prop, i);
    if (err != cudaSuccess) {
      set_error(out, "cudaGetDeviceProperties", err);
      cudaGetLastError();
      out->device_count = 0;
      return;
    }
    MoeCudaDevice& d = out->devices[i];
    std::snprintf(d.name, sizeof(d.name), "%s", prop.name);
    d.total_memory = static_cast<unsigned long long>(prop.totalGlobalMem);
    d.cc_major = prop.major;
    d.cc_minor = prop.minor;
  }
  out->device_count = count;
}
