// Compiled instead of device_probe.cu when the addon is built without CUDA.
#include "device_probe.h"

#include <cstring>

extern "C" void moe_cuda_probe(MoeCudaProbe* out) {
  std::memset(out, 0, sizeof(*out));
  out->compiled = 0;
  std::strncpy(out->error, "built without CUDA (nvcc not found or MOE_SERVE_CUDA=0)", sizeof(out->error) - 1);
}
