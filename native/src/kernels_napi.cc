// N-API bindings of the kernels for tests and benchmarks (typed in src/engine/native.ts):
// format conversion, one-shot matmuls, the thread-pool error path, and native timing
// loops (so that JS overhead is not what the benchmark measures).
#include <napi.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"
#include "thread_pool.h"
#include "vecops.h"

namespace moe {
namespace {

WType type_arg(const Napi::Value& v) {
  WType t;
  if (!v.IsString() || !wtype_from_name(v.As<Napi::String>().Utf8Value(), &t)) {
    throw Napi::TypeError::New(v.Env(), "weight type must be one of f32 f16 bf16 q8_0 q4_0");
  }
  return t;
}

int64_t int_arg(const Napi::CallbackInfo& info, size_t i, const char* what, int64_t lo, int64_t hi) {
  if (i >= info.Length() || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a number");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d)) || d < static_cast<double>(lo) || d > static_cast<double>(hi)) {
    throw Napi::RangeError::New(info.Env(), std::string(what) + " must be an integer in [" + std::to_string(lo) + ", " +
                                                 std::to_string(hi) + "], got " + std::to_string(d));
  }
  return static_cast<int64_t>(d);
}

void check_cols(Napi::Env env, WType t, int64_t cols) {
  if (cols % block_cols(t) != 0) {
    throw Napi::RangeError::New(env, std::string(wtype_name(t)) + " needs cols to be a multiple of " +
                                         std::to_string(block_cols(t)) + ", got " + std::to_string(cols));
  }
}

Napi::Float32Array f32_arg(const Napi::CallbackInfo& info, size_t i, const char* what, size_t need) {
  if (i >= info.Length() || !info[i].IsTypedArray() ||
      info[i].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
    throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a Float32Array");
  }
  Napi::Float32Array a = info[i].As<Napi::Float32Array>();
  if (a.ElementLength() < need) {
    throw Napi::RangeError::New(info.Env(), std::string(what) + " has " + std::to_string(a.ElementLength()) +
                                                 " elements, needs " + std::to_string(need));
  }
  return a;
}

Napi::Uint8Array u8_arg(const Napi::CallbackInfo& info, size_t i, const char* what, size_t need) {
  if (i >= info.Length() || !info[i].IsTypedArray() ||
      info[i].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a Uint8Array");
  }
  Napi::Uint8Array a = info[i].As<Napi::Uint8Array>();
  if (a.ByteLength() < need) {
    throw Napi::RangeError::New(info.Env(), std::string(what) + " has " + std::to_string(a.ByteLength()) +
                                                 " bytes, needs " + std::to_string(need));
  }
  return a;
}

constexpr int64_t kMaxDim = int64_t{1} << 31;

bool isa_from_name(const std::string& s, Isa* out) {
  if (s == "scalar") *out = Isa::Scalar;
  else if (s == "avx2") *out = Isa::Avx2;
  else if (s == "avx512") *out = Isa::Avx512;
  else return false;
  return true;
}

Napi::Value KernelInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CpuFeatures& f = cpu_features();
  Napi::Object o = Napi::Object::New(env);
  o.Set("best", isa_name(best_isa()));
  o.Set("active", isa_name(active_isa()));
  o.Set("vnni", f.avx512vnni && best_isa() == Isa::Avx512);
  o.Set("bf16", f.avx512bf16 && best_isa() == Isa::Avx512);
  o.Set("amx", amx_in_use());
  o.Set("amxStatus", amx_status());
  return o;
}

Napi::Value SetIsa(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Isa isa;
  if (info.Length() < 1 || !info[0].IsString() || !isa_from_name(info[0].As<Napi::String>().Utf8Value(), &isa)) {
    throw Napi::TypeError::New(env, "setIsa: name must be one of scalar avx2 avx512");
  }
  return Napi::Boolean::New(env, set_isa(isa));
}

// quantizeRows(type, f32, rows, cols) -> Uint8Array(rows * rowBytes)
Napi::Value QuantizeRows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const WType t = type_arg(info[0]);
  const int64_t rows = int_arg(info, 2, "rows", 0, kMaxDim);
  const int64_t cols = int_arg(info, 3, "cols", 0, kMaxDim);
  check_cols(env, t, cols);
  Napi::Float32Array src = f32_arg(info, 1, "f32", static_cast<size_t>(rows * cols));
  Napi::Uint8Array out = Napi::Uint8Array::New(env, static_cast<size_t>(rows) * row_bytes(t, cols));
  quantize_rows(t, src.Data(), rows, cols, out.Data());
  return out;
}

// dequantizeRow(type, bytes, cols) -> Float32Array(cols)
Napi::Value DequantizeRow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const WType t = type_arg(info[0]);
  const int64_t cols = int_arg(info, 2, "cols", 0, kMaxDim);
  check_cols(env, t, cols);
  Napi::Uint8Array src = u8_arg(info, 1, "bytes", row_bytes(t, cols));
  Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(cols));
  dequantize_row(t, src.Data(), cols, out.Data());
  return out;
}

// actsDequantize(type, x, n, cols) -> Float32Array(n * cols): the activations as the kernels see them.
Napi::Value ActsDequantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const WType t = type_arg(info[0]);
  const int64_t n = int_arg(info, 2, "n", 0, kMaxDim);
  const int64_t cols = int_arg(info, 3, "cols", 0, kMaxDim);
  check_cols(env, t, cols);
  Napi::Float32Array x = f32_arg(info, 1, "x", static_cast<size_t>(n * cols));
  Acts acts;
  prepare_acts(t, x.Data(), n, cols, cols, acts);
  Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(n * cols));
  for (int64_t i = 0; i < n; ++i) acts_dequantize(acts, i, out.Data() + i * cols);
  return out;
}

// matmulTest(type, weights, rows, cols, x, n, threads) -> Float32Array(n * rows), y[t * rows + r]
Napi::Value MatmulTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const WType t = type_arg(info[0]);
  const int64_t rows = int_arg(info, 2, "rows", 0, kMaxDim);
  const int64_t cols = int_arg(info, 3, "cols", 0, kMaxDim);
  const int64_t n = int_arg(info, 5, "n", 0, 1 << 20);
  const int64_t threads = int_arg(info, 6, "threads", 1, 256);
  check_cols(env, t, cols);
  Napi::Uint8Array w = u8_arg(info, 1, "weights", static_cast<size_t>(rows) * row_bytes(t, cols));
  Napi::Float32Array x = f32_arg(info, 4, "x", static_cast<size_t>(n * cols));
  if (t == WType::Q8_0) {
    // The format's weights are in [-127, 127] (kernels.h).
    const size_t blocks = static_cast<size_t>(rows) * static_cast<size_t>(cols / 32);
    for (size_t b = 0; b < blocks; ++b) {
      const uint8_t* q = w.Data() + b * 34 + 2;
      for (int j = 0; j < 32; ++j) {
        if (q[j] == 0x80) throw Napi::RangeError::New(env, "q8_0 weights must be in [-127, 127]: block " + std::to_string(b) + " holds -128");
      }
    }
  }
  Acts acts;
  prepare_acts(t, x.Data(), n, cols, cols, acts);
  Napi::Float32Array y = Napi::Float32Array::New(env, static_cast<size_t>(n * rows));
  const WMat m{t, rows, cols, w.Data()};
  ThreadPool pool(static_cast<int>(threads));
  matmul_parallel(pool, m, acts, y.Data(), rows);
  return y;
}

// amxMatmulTest(weights, rows, cols, x, n) -> Float32Array(n * rows): the AMX Q8_0 kernel
// with its tile instructions modelled in C++ (kernels_amx_emu.cc), one thread, for the
// tokens [0, n / 32 * 32); the other tokens' outputs are left NaN.
Napi::Value AmxMatmulTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t rows = int_arg(info, 1, "rows", 0, kMaxDim);
  const int64_t cols = int_arg(info, 2, "cols", 0, kMaxDim);
  const int64_t n = int_arg(info, 4, "n", 0, 1 << 20);
  check_cols(env, WType::Q8_0, cols);
  Napi::Uint8Array w = u8_arg(info, 0, "weights", static_cast<size_t>(rows) * row_bytes(WType::Q8_0, cols));
  Napi::Float32Array x = f32_arg(info, 3, "x", static_cast<size_t>(n * cols));
  Acts acts;
  prepare_acts(WType::Q8_0, x.Data(), n, cols, cols, acts);
  Napi::Float32Array y = Napi::Float32Array::New(env, static_cast<size_t>(n * rows));
  std::fill(y.Data(), y.Data() + n * rows, std::numeric_limits<float>::quiet_NaN());
  const WMat m{WType::Q8_0, rows, cols, w.Data()};
  try {
    kdetail::matmul_q8_amx_emulated(m, acts, 0, rows, y.Data(), rows);
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
  return y;
}

Napi::Int32Array i32_arg(const Napi::CallbackInfo& info, size_t i, const char* what, size_t need) {
  if (i >= info.Length() || !info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
    throw Napi::TypeError::New(info.Env(), std::string(what) + " must be an Int32Array");
  }
  Napi::Int32Array a = info[i].As<Napi::Int32Array>();
  if (a.ElementLength() < need) {
    throw Napi::RangeError::New(info.Env(), std::string(what) + " has " + std::to_string(a.ElementLength()) + " elements, needs " +
                                                 std::to_string(need));
  }
  return a;
}

// attendTest(q, keys, values, blocks, nq, headDim, blockSize, kvHeads, g, visible, scale)
//   -> Float32Array(nq * headDim): attend() of the active ISA over a paged cache in the
//   layout of vecops.h (keys / values hold whole blocks; every block id used must be inside):
//   Float32Arrays, or Uint16Arrays of float16 bits (both the same type).
Napi::Value AttendTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t nq = int_arg(info, 4, "nq", 1, 1024);
  const int64_t hd = int_arg(info, 5, "headDim", 1, 4096);
  const int64_t bs = int_arg(info, 6, "blockSize", 1, 4096);
  const int64_t kvh = int_arg(info, 7, "kvHeads", 1, 1024);
  const int64_t g = int_arg(info, 8, "g", 0, kvh - 1);
  const int64_t visible = int_arg(info, 9, "visible", 1, 1 << 20);
  if (info.Length() < 11 || !info[10].IsNumber()) throw Napi::TypeError::New(env, "scale must be a number");
  const float scale = info[10].As<Napi::Number>().FloatValue();
  Napi::Float32Array q = f32_arg(info, 0, "q", static_cast<size_t>(nq * hd));
  const size_t block_elems = static_cast<size_t>(kvh * hd * bs);
  const auto cache_arg = [&](size_t i, const char* what) {
    if (i >= info.Length() || !info[i].IsTypedArray()) throw Napi::TypeError::New(env, std::string(what) + " must be a Float32Array or a Uint16Array");
    const Napi::TypedArray a = info[i].As<Napi::TypedArray>();
    if (a.TypedArrayType() != napi_float32_array && a.TypedArrayType() != napi_uint16_array) {
      throw Napi::TypeError::New(env, std::string(what) + " must be a Float32Array or a Uint16Array");
    }
    if (a.ElementLength() < block_elems) {
      throw Napi::RangeError::New(env, std::string(what) + " has " + std::to_string(a.ElementLength()) + " elements, needs " + std::to_string(block_elems));
    }
    return a;
  };
  const Napi::TypedArray keys = cache_arg(1, "keys");
  const Napi::TypedArray values = cache_arg(2, "values");
  if (keys.TypedArrayType() != values.TypedArrayType()) throw Napi::TypeError::New(env, "keys and values must be the same array type");
  const bool f16 = keys.TypedArrayType() == napi_uint16_array;
  const auto base = [](const Napi::TypedArray& a) { return static_cast<const uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset(); };
  const int64_t n_blocks = (visible + bs - 1) / bs;
  Napi::Int32Array blocks = i32_arg(info, 3, "blocks", static_cast<size_t>(n_blocks));
  const int64_t have = static_cast<int64_t>(std::min(keys.ElementLength(), values.ElementLength()) / block_elems);
  for (int64_t i = 0; i < n_blocks; i++) {
    if (blocks[static_cast<size_t>(i)] < 0 || blocks[static_cast<size_t>(i)] >= have) {
      throw Napi::RangeError::New(env, "block " + std::to_string(blocks[static_cast<size_t>(i)]) + " outside the " + std::to_string(have) + " given");
    }
  }
  Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(nq * hd));
  AttnArgs a{q.Data(), nq, hd, base(keys), base(values), f16, blocks.Data(), bs, kvh, g, visible, scale, out.Data()};
  vecops().attend(a);
  return out;
}

// siluMulTest(gate, up) -> Float32Array: silu(gate) * up with the active ISA.
Napi::Value SiluMulTest(const Napi::CallbackInfo& info) {
  Napi::Float32Array gate = f32_arg(info, 0, "gate", 0);
  Napi::Float32Array up = f32_arg(info, 1, "up", gate.ElementLength());
  Napi::Float32Array out = Napi::Float32Array::New(info.Env(), gate.ElementLength());
  vecops().silu_mul(out.Data(), gate.Data(), up.Data(), static_cast<int64_t>(gate.ElementLength()));
  return out;
}

// expWeights(logits: Float32Array, off, n, temperature, out: Float64Array) -> sum: the
// sampling weights out[i] = e^((logits[off + i] - max) / temperature) over the window
// [off, off + n) (max over it), computed with the active ISA in float32; returns their sum.
Napi::Value ExpWeights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t off = int_arg(info, 1, "off", 0, kMaxDim);
  const int64_t n = int_arg(info, 2, "n", 1, kMaxDim);
  if (info.Length() < 4 || !info[3].IsNumber()) throw Napi::TypeError::New(env, "temperature must be a number");
  const double temperature = info[3].As<Napi::Number>().DoubleValue();
  // 1 / temperature must be a finite float32 (the weights are computed in float32).
  if (!(temperature >= 1e-30) || !std::isfinite(temperature)) throw Napi::RangeError::New(env, "temperature must be a finite number >= 1e-30");
  Napi::Float32Array x = f32_arg(info, 0, "logits", static_cast<size_t>(off + n));
  if (info.Length() < 5 || !info[4].IsTypedArray() || info[4].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    throw Napi::TypeError::New(env, "out must be a Float64Array");
  }
  Napi::Float64Array out = info[4].As<Napi::Float64Array>();
  if (out.ElementLength() < static_cast<size_t>(n)) throw Napi::RangeError::New(env, "out has " + std::to_string(out.ElementLength()) + " elements, needs " + std::to_string(n));
  const double sum = vecops().exp_weights(x.Data() + off, n, static_cast<float>(1.0 / temperature), out.Data());
  return Napi::Number::New(env, sum);
}

// gatherActsTest(type, x, n, cols, rows) -> [gathered, prepared]: the bytes of gather_acts
// of the given rows out of activations prepared from x (n rows), and of prepare_acts of
// those rows' inputs, each as long as the kernels' layout for that many rows.
Napi::Value GatherActsTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const WType t = type_arg(info[0]);
  const int64_t n = int_arg(info, 2, "n", 0, kMaxDim);
  const int64_t cols = int_arg(info, 3, "cols", 0, kMaxDim);
  check_cols(env, t, cols);
  Napi::Float32Array x = f32_arg(info, 1, "x", static_cast<size_t>(n * cols));
  Napi::Int32Array rows = i32_arg(info, 4, "rows", 0);
  const int64_t m = static_cast<int64_t>(rows.ElementLength());
  Acts all, gathered, direct;
  prepare_acts(t, x.Data(), n, cols, cols, all);
  try {
    gather_acts(all, rows.Data(), m, gathered);
  } catch (const std::out_of_range& e) {
    throw Napi::RangeError::New(env, e.what());
  }
  std::vector<float> picked(static_cast<size_t>(m * cols));
  for (int64_t i = 0; i < m; i++) std::memcpy(picked.data() + i * cols, x.Data() + rows[static_cast<size_t>(i)] * cols, static_cast<size_t>(cols) * 4);
  prepare_acts(t, picked.data(), m, cols, cols, direct);
  const size_t bytes = kdetail::acts_bytes(t, m, cols);
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Buffer<uint8_t>::Copy(env, gathered.buf.data(), bytes));
  out.Set(1u, Napi::Buffer<uint8_t>::Copy(env, direct.buf.data(), bytes));
  return out;
}

// poolThrowTest(threads, items): runs `items` items of ~50 us each; the first item that
// runs on a worker thread (thread index > 0) throws. Returns the caller's error message path.
Napi::Value PoolThrowTest(const Napi::CallbackInfo& info) {
  const int64_t threads = int_arg(info, 0, "threads", 2, 256);
  const int64_t items = int_arg(info, 1, "items", 1, 1 << 20);
  ThreadPool pool(static_cast<int>(threads));
  std::atomic<bool> thrown{false};
  std::atomic<int64_t> ran{0};
  pool.parallel_for(items, 1, [&](int64_t i, int thread) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    ran.fetch_add(1);
    if (thread > 0 && !thrown.exchange(true)) {
      throw std::runtime_error("worker " + std::to_string(thread) + " failed on item " + std::to_string(i));
    }
  });
  // No worker took an item (should not happen with enough items): report how many ran.
  return Napi::Number::New(info.Env(), static_cast<double>(ran.load()));
}

// Memory for benchmarks: 2 MB aligned, transparent huge pages where the kernel allows.
struct BigBuf {
  uint8_t* p = nullptr;
  size_t size = 0;
  explicit BigBuf(size_t bytes) : size(bytes) {
    void* q = nullptr;
    if (posix_memalign(&q, size_t{2} << 20, bytes) != 0) throw std::runtime_error("out of memory: " + std::to_string(bytes) + " bytes");
    p = static_cast<uint8_t*>(q);
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
  }
  ~BigBuf() { std::free(p); }
  BigBuf(const BigBuf&) = delete;
  BigBuf& operator=(const BigBuf&) = delete;
};

using Clock = std::chrono::steady_clock;

// kernelBench(type, rows, cols, n, threads, minBytes, seconds) ->
//   {calls, seconds (per call), bytesPerCall, copies, isa}
// Cycles through `copies` distinct weight matrices (together >= minBytes) so that the
// weights come from memory, not from the caches, as the engine's experts do.
Napi::Value KernelBench(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const WType t = type_arg(info[0]);
  const int64_t rows = int_arg(info, 1, "rows", 1, kMaxDim);
  const int64_t cols = int_arg(info, 2, "cols", 1, kMaxDim);
  const int64_t n = int_arg(info, 3, "n", 1, 1 << 16);
  const int64_t threads = int_arg(info, 4, "threads", 1, 256);
  const int64_t min_bytes = int_arg(info, 5, "minBytes", 0, int64_t{1} << 40);
  const double seconds = info[6].As<Napi::Number>().DoubleValue();
  check_cols(env, t, cols);

  const size_t rb = row_bytes(t, cols);
  const size_t mat_bytes = static_cast<size_t>(rows) * rb;
  const size_t copies = std::max<size_t>(1, (static_cast<size_t>(min_bytes) + mat_bytes - 1) / mat_bytes);
  BigBuf w(mat_bytes * copies);
  {
    // Realistic values: 64 quantized random rows tiled over everything.
    std::mt19937 rng(1234);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    const int64_t pr = std::min<int64_t>(rows, 64);
    std::vector<float> f(static_cast<size_t>(pr * cols));
    for (float& v : f) v = nd(rng);
    std::vector<uint8_t> q(static_cast<size_t>(pr) * rb);
    quantize_rows(t, f.data(), pr, cols, q.data());
    for (size_t off = 0; off < w.size; off += q.size()) std::memcpy(w.p + off, q.data(), std::min(q.size(), w.size - off));
  }
  std::vector<float> x(static_cast<size_t>(n * cols));
  {
    std::mt19937 rng(99);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (float& v : x) v = nd(rng);
  }
  Acts acts;
  prepare_acts(t, x.data(), n, cols, cols, acts);
  std::vector<float> y(static_cast<size_t>(n * rows));
  ThreadPool pool(static_cast<int>(threads));

  auto call = [&](size_t i) {
    const WMat m{t, rows, cols, w.p + (i % copies) * mat_bytes};
    matmul_parallel(pool, m, acts, y.data(), rows);
  };
  for (size_t i = 0; i < copies; ++i) call(i);  // warm-up: page in, wake threads
  int64_t calls = 0;
  const Clock::time_point start = Clock::now();
  double elapsed = 0;
  do {
    for (int k = 0; k < 4; ++k) call(static_cast<size_t>(calls++));
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (elapsed < seconds);

  // prepare_acts cost, for the record (reusing the buffer: no allocation).
  int64_t preps = 0;
  const Clock::time_point p0 = Clock::now();
  double pel = 0;
  do {
    prepare_acts(t, x.data(), n, cols, cols, acts);
    ++preps;
    pel = std::chrono::duration<double>(Clock::now() - p0).count();
  } while (pel < 0.02);

  Napi::Object o = Napi::Object::New(env);
  o.Set("calls", static_cast<double>(calls));
  o.Set("seconds", elapsed / static_cast<double>(calls));
  o.Set("bytesPerCall", static_cast<double>(mat_bytes));
  o.Set("copies", static_cast<double>(copies));
  o.Set("prepareSeconds", pel / static_cast<double>(preps));
  o.Set("isa", isa_name(active_isa()));
  o.Set("checksum", static_cast<double>(y[0]));
  return o;
}

// The probe's buffer, kept between calls that ask for it (keep = true): allocating and
// filling 1 GiB of huge pages makes the kernel compact memory, which took CPU time from
// the measurements right after it on two cores (decode steps 25 -> 45-65 ms, a batch step
// 220 -> 855 ms) when probes ran between chunks of a measurement.
std::mutex g_probe_mu;
std::unique_ptr<BigBuf> g_probe_buf;

// streamBench(bytes, threads, seconds, keep = false) -> {passes, seconds (per pass), bytes}
// The bandwidth probe: every thread of the pool streams its share of one big buffer.
Napi::Value StreamBench(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t bytes = int_arg(info, 0, "bytes", 1 << 20, int64_t{1} << 40);
  const int64_t threads = int_arg(info, 1, "threads", 1, 256);
  const double seconds = info[2].As<Napi::Number>().DoubleValue();
  const bool keep = info.Length() > 3 && info[3].IsBoolean() && info[3].As<Napi::Boolean>().Value();
  std::lock_guard<std::mutex> lock(g_probe_mu);
  if (!g_probe_buf || g_probe_buf->size != static_cast<size_t>(bytes)) {
    g_probe_buf.reset();
    g_probe_buf = std::make_unique<BigBuf>(static_cast<size_t>(bytes));
    for (size_t i = 0; i < g_probe_buf->size; i += 4096) g_probe_buf->p[i] = static_cast<uint8_t>(i >> 12);
    std::memset(g_probe_buf->p, 1, g_probe_buf->size);
  }
  BigBuf& buf = *g_probe_buf;
  ThreadPool pool(static_cast<int>(threads));
  constexpr size_t kChunk = size_t{1} << 20;
  const int64_t chunks = static_cast<int64_t>((buf.size + kChunk - 1) / kChunk);
  std::vector<uint64_t> sink(static_cast<size_t>(threads) * 8, 0);
  auto pass = [&] {
    pool.parallel_for(chunks, 1, [&](int64_t i, int th) {
      const size_t off = static_cast<size_t>(i) * kChunk;
      sink[static_cast<size_t>(th) * 8] += stream_read(buf.p + off, std::min(kChunk, buf.size - off));
    });
  };
  pass();
  int64_t passes = 0;
  const Clock::time_point start = Clock::now();
  double elapsed = 0;
  do {
    pass();
    ++passes;
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (elapsed < seconds);
  Napi::Object o = Napi::Object::New(env);
  o.Set("passes", static_cast<double>(passes));
  o.Set("seconds", elapsed / static_cast<double>(passes));
  o.Set("bytes", static_cast<double>(bytes));
  uint64_t s = 0;
  for (uint64_t v : sink) s += v;
  o.Set("checksum", static_cast<double>(s & 0xffff));
  if (!keep) g_probe_buf.reset();
  return o;
}

// macPeakBench(threads, seconds, mix = "q8_0") -> {macs, seconds, checksum}
// The compute probe: every thread of a pool of `threads` runs int8_mac_peak (the active
// ISA's int8 multiply-accumulate instructions on registers) in rounds, until `seconds`;
// mix "q4_0": int8_mac_peak_q4_groups (the Q4_0 token-group kernel's mix).
Napi::Value MacPeakBench(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t threads = int_arg(info, 0, "threads", 1, 256);
  if (info.Length() < 2 || !info[1].IsNumber()) throw Napi::TypeError::New(env, "seconds must be a number");
  const double seconds = info[1].As<Napi::Number>().DoubleValue();
  if (!(seconds > 0 && seconds <= 60)) throw Napi::RangeError::New(env, "seconds must be in (0, 60]");
  bool q4 = false;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    if (!info[2].IsString()) throw Napi::TypeError::New(env, "mix must be \"q8_0\" or \"q4_0\"");
    const std::string mix = info[2].As<Napi::String>().Utf8Value();
    if (mix != "q8_0" && mix != "q4_0") throw Napi::RangeError::New(env, "mix must be \"q8_0\" or \"q4_0\", got \"" + mix + "\"");
    q4 = mix == "q4_0";
  }
  ThreadPool pool(static_cast<int>(threads));
  std::vector<uint64_t> sink(static_cast<size_t>(threads) * 8, 0);
  std::vector<int64_t> done(static_cast<size_t>(threads) * 8, 0);
  constexpr int64_t kIters = int64_t{1} << 16;  // a round: about a millisecond per thread
  auto round = [&] {
    pool.parallel_for(threads, 1, [&](int64_t, int th) {
      int64_t macs = 0;
      sink[static_cast<size_t>(th) * 8] += q4 ? int8_mac_peak_q4_groups(kIters, &macs) : int8_mac_peak(kIters, &macs);
      done[static_cast<size_t>(th) * 8] += macs;
    });
  };
  round();  // warm-up (clocks, pool start)
  std::fill(done.begin(), done.end(), 0);
  const Clock::time_point start = Clock::now();
  double elapsed = 0;
  do {
    round();
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (elapsed < seconds);
  double macs = 0;
  for (int64_t v : done) macs += static_cast<double>(v);
  uint64_t s = 0;
  for (uint64_t v : sink) s += v;
  Napi::Object o = Napi::Object::New(env);
  o.Set("macs", macs);
  o.Set("seconds", elapsed);
  o.Set("checksum", static_cast<double>(s & 0xffff));
  return o;
}

}  // namespace

void RegisterKernels(Napi::Env env, Napi::Object exports) {
  exports.Set("kernelInfo", Napi::Function::New(env, KernelInfo, "kernelInfo"));
  exports.Set("setIsa", Napi::Function::New(env, SetIsa, "setIsa"));
  exports.Set("quantizeRows", Napi::Function::New(env, QuantizeRows, "quantizeRows"));
  exports.Set("dequantizeRow", Napi::Function::New(env, DequantizeRow, "dequantizeRow"));
  exports.Set("actsDequantize", Napi::Function::New(env, ActsDequantize, "actsDequantize"));
  exports.Set("matmulTest", Napi::Function::New(env, MatmulTest, "matmulTest"));
  exports.Set("amxMatmulTest", Napi::Function::New(env, AmxMatmulTest, "amxMatmulTest"));
  exports.Set("attendTest", Napi::Function::New(env, AttendTest, "attendTest"));
  exports.Set("siluMulTest", Napi::Function::New(env, SiluMulTest, "siluMulTest"));
  exports.Set("expWeights", Napi::Function::New(env, ExpWeights, "expWeights"));
  exports.Set("gatherActsTest", Napi::Function::New(env, GatherActsTest, "gatherActsTest"));
  exports.Set("poolThrowTest", Napi::Function::New(env, PoolThrowTest, "poolThrowTest"));
  exports.Set("kernelBench", Napi::Function::New(env, KernelBench, "kernelBench"));
  exports.Set("streamBench", Napi::Function::New(env, StreamBench, "streamBench"));
  exports.Set("macPeakBench", Napi::Function::New(env, MacPeakBench, "macPeakBench"));
}

}  // namespace moe
