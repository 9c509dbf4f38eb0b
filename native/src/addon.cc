// The single registration point of the moe_native addon: every native function and
// class is added to `exports` here (directly or through a module's Register*), once
// per environment (main thread and each worker thread).
//
// Exceptions: built with NAPI_CPP_EXCEPTIONS + NODE_ADDON_API_CPP_EXCEPTIONS_ALL, so
// a C++ exception that reaches the Node-API boundary becomes a JS Error carrying its
// message; modules throw Napi::Error with a `code` where callers branch on it.
#include <napi.h>

#include <thread>

#include "cpu_features.h"
#include "device_probe.h"
#include "engine_napi.h"
#include "safetensors.h"

namespace moe {

void RegisterKernels(Napi::Env env, Napi::Object exports);  // kernels_napi.cc

namespace {

Napi::Value Version(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), MOE_NATIVE_VERSION); }

Napi::Value CpuFeaturesJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CpuFeatures& f = cpu_features();
  Napi::Object o = Napi::Object::New(env);
  o.Set("sse42", f.sse42);
  o.Set("avx", f.avx);
  o.Set("avx2", f.avx2);
  o.Set("fma", f.fma);
  o.Set("f16c", f.f16c);
  o.Set("avx512f", f.avx512f);
  o.Set("avx512bw", f.avx512bw);
  o.Set("avx512vl", f.avx512vl);
  o.Set("avx512vnni", f.avx512vnni);
  o.Set("avx512bf16", f.avx512bf16);
  o.Set("avx512fp16", f.avx512fp16);
  o.Set("amxTile", f.amx_tile);
  o.Set("amxInt8", f.amx_int8);
  o.Set("amxBf16", f.amx_bf16);
  return o;
}

Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // ~17 KB: keep it off the stack of the JS thread.
  auto probe = std::make_unique<MoeCudaProbe>();
  moe_cuda_probe(probe.get());
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", probe->compiled != 0);
  o.Set("deviceCount", probe->device_count);
  if (probe->error[0] != '\0') {
    o.Set("error", Napi::String::New(env, probe->error));
  } else {
    o.Set("error", env.Null());
  }
  const int listed = probe->device_count < MOE_CUDA_MAX_DEVICES ? probe->device_count : MOE_CUDA_MAX_DEVICES;
  Napi::Array devices = Napi::Array::New(env, static_cast<size_t>(listed));
  for (int i = 0; i < listed; ++i) {
    const MoeCudaDevice& d = probe->devices[i];
    Napi::Object dev = Napi::Object::New(env);
    dev.Set("name", d.name);
    dev.Set("totalMemory", static_cast<double>(d.total_memory));
    dev.Set("computeCapability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
    devices.Set(static_cast<uint32_t>(i), dev);
  }
  o.Set("devices", devices);
  return o;
}

Napi::Value HardwareConcurrency(const Napi::CallbackInfo& info) {
  const unsigned n = std::thread::hardware_concurrency();
  return Napi::Number::New(info.Env(), n == 0 ? 1 : n);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("version", Napi::Function::New(env, Version, "version"));
  exports.Set("cpuFeatures", Napi::Function::New(env, CpuFeaturesJs, "cpuFeatures"));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo, "cudaInfo"));
  exports.Set("hardwareConcurrency", Napi::Function::New(env, HardwareConcurrency, "hardwareConcurrency"));
  RegisterSafetensors(env, exports);
  RegisterEngine(env, exports);
  RegisterKernels(env, exports);
  return exports;
}

}  // namespace
}  // namespace moe

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return moe::Init(env, exports); }

NODE_API_MODULE(moe_native, InitModule)
