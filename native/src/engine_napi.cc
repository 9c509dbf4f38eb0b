// NativeEngine: the Node-API face of Engine. Arguments are checked here (types,
// lengths, ranges) so that the engine only sees consistent data; every C++ exception
// becomes a JS Error with its message.
#include "engine_napi.h"

#include <napi.h>

#include <memory>
#include <string>
#include <vector>

#include "engine.h"
#include "kernels.h"

namespace moe {

namespace {

int64_t get_int(const Napi::Object& o, const char* key, int64_t def, bool required) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) {
    if (required) throw std::invalid_argument(std::string("engine option ") + key + " is required");
    return def;
  }
  if (!v.IsNumber()) throw std::invalid_argument(std::string("engine option ") + key + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d))) throw std::invalid_argument(std::string("engine option ") + key + " must be an integer");
  return static_cast<int64_t>(d);
}

double get_num(const Napi::Object& o, const char* key, double def) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsNumber()) throw std::invalid_argument(std::string("engine option ") + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

bool get_bool(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  return v.IsBoolean() && v.As<Napi::Boolean>().Value();
}

// offload.slotsPerLayer: a number (every layer the same) or an array of one count per
// layer (the cache budget split unequally). Each count must be a positive integer, at
// most `experts`; the store checks the counts again.
std::vector<int64_t> get_slots(const Napi::Object& oo, int64_t layers, int64_t experts) {
  const Napi::Value v = oo.Get("slotsPerLayer");
  const std::string what = "engine option offload.slotsPerLayer";
  const auto check = [&](const Napi::Value& x, const std::string& where) -> int64_t {
    if (!x.IsNumber()) throw std::invalid_argument(what + " must hold numbers" + where);
    const double d = x.As<Napi::Number>().DoubleValue();
    if (!(d >= -9007199254740992.0 && d <= 9007199254740992.0) || d != static_cast<double>(static_cast<int64_t>(d))) {
      throw std::invalid_argument(what + " must hold integers" + where + ", got " + std::to_string(d));
    }
    const int64_t n = static_cast<int64_t>(d);
    if (n <= 0) throw std::invalid_argument(what + " must be positive" + where + ", got " + std::to_string(n));
    if (n > experts) throw std::invalid_argument(what + " must be in 1.." + std::to_string(experts) + where + ", got " + std::to_string(n));
    return n;
  };
  if (v.IsUndefined() || v.IsNull()) throw std::invalid_argument(what + " is required");
  if (layers <= 0) throw std::invalid_argument("engine option layers must be positive, got " + std::to_string(layers));
  if (v.IsNumber()) return std::vector<int64_t>(static_cast<size_t>(layers), check(v, ""));
  if (!v.IsArray()) throw std::invalid_argument(what + " must be a number or an array of one number per layer");
  const Napi::Array a = v.As<Napi::Array>();
  if (static_cast<int64_t>(a.Length()) != layers) {
    throw std::invalid_argument(what + " must have one entry per layer (" + std::to_string(layers) + "), got " + std::to_string(a.Length()));
  }
  std::vector<int64_t> out(static_cast<size_t>(layers));
  for (uint32_t l = 0; l < a.Length(); l++) out[l] = check(a.Get(l), " (layer " + std::to_string(l) + ")");
  return out;
}

// An integer argument (a JS number with no fraction, within +-2^53).
int64_t arg_int(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsNumber()) throw std::invalid_argument(std::string(what) + " must be an integer");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= -9007199254740992.0 && d <= 9007199254740992.0) || d != static_cast<double>(static_cast<int64_t>(d))) {
    throw std::invalid_argument(std::string(what) + " must be an integer");
  }
  return static_cast<int64_t>(d);
}

template <typename T>
struct TypedName;
template <>
struct TypedName<Napi::Int32Array> {
  static constexpr napi_typedarray_type type = napi_int32_array;
  static constexpr const char* name = "an Int32Array";
};
template <>
struct TypedName<Napi::Float32Array> {
  static constexpr napi_typedarray_type type = napi_float32_array;
  static constexpr const char* name = "a Float32Array";
};
template <>
struct TypedName<Napi::Uint8Array> {
  static constexpr napi_typedarray_type type = napi_uint8_array;
  static constexpr const char* name = "a Uint8Array";
};

// The element type is checked too: another typed array's element count would be read
// as a count of T (a Uint8Array taken for a Float32Array is a quarter of its length).
template <typename T>
T typed(const Napi::Value& v, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != TypedName<T>::type) {
    throw std::invalid_argument(std::string(what) + " must be " + TypedName<T>::name);
  }
  return v.As<T>();
}

// Decodes the step description: tokens (Int32Array), seqs (Int32Array of
// [start_pos, n_tokens, want_logits, n_blocks] per sequence) and the concatenated block
// tables (Int32Array).
void read_batch(const Napi::CallbackInfo& info, std::vector<int32_t>& tokens, std::vector<SeqSlice>& seqs) {
  if (info.Length() < 3) throw std::invalid_argument("expected (tokens, seqs, blocks)");
  auto tok = typed<Napi::Int32Array>(info[0], "tokens");
  auto meta = typed<Napi::Int32Array>(info[1], "seqs");
  auto blocks = typed<Napi::Int32Array>(info[2], "blocks");
  if (meta.ElementLength() % 4 != 0) throw std::invalid_argument("seqs must hold 4 integers per sequence");
  tokens.assign(tok.Data(), tok.Data() + tok.ElementLength());
  const size_t n = meta.ElementLength() / 4;
  seqs.assign(n, SeqSlice{});
  size_t tok_off = 0, blk_off = 0;
  for (size_t s = 0; s < n; s++) {
    const int32_t* m = meta.Data() + 4 * s;
    if (m[1] <= 0 || m[3] < 0 || m[0] < 0) throw std::invalid_argument("sequence " + std::to_string(s) + " has a bad description");
    SeqSlice& q = seqs[s];
    q.start_pos = m[0];
    q.n_tokens = m[1];
    q.want_logits = m[2] != 0;
    q.token_offset = static_cast<int64_t>(tok_off);
    if (blk_off + static_cast<size_t>(m[3]) > blocks.ElementLength()) throw std::invalid_argument("block tables are shorter than the sequences say");
    q.blocks.assign(blocks.Data() + blk_off, blocks.Data() + blk_off + m[3]);
    tok_off += static_cast<size_t>(m[1]);
    blk_off += static_cast<size_t>(m[3]);
  }
  if (tok_off != tokens.size()) throw std::invalid_argument("the sequences' token counts do not add up to the tokens given");
}

Napi::Float32Array to_js(Napi::Env env, const std::vector<float>& v) {
  auto out = Napi::Float32Array::New(env, v.size());
  std::copy(v.begin(), v.end(), out.Data());
  return out;
}

// Logits of a step, (rows, vocab) = `n` floats, written by `fill` straight into JS memory:
// a 32-sequence step of a 152k vocabulary returns 19 MB, and a native vector copied into
// a fresh JS array every step cost about as much as that step's attention. With an
// `out` argument (a Float32Array of at least n floats, reused by the caller from step to
// step) the logits go into its first n floats and the result is a view of them: no
// allocation, no page faults. Without it, a new array.
template <typename Fill>
Napi::Float32Array logits_to_js(const Napi::CallbackInfo& info, size_t out_arg, size_t n, Fill fill) {
  Napi::Env env = info.Env();
  if (info.Length() > out_arg && !info[out_arg].IsUndefined()) {
    auto out = typed<Napi::Float32Array>(info[out_arg], "out");
    if (out.ElementLength() < n) {
      throw std::invalid_argument("out holds " + std::to_string(out.ElementLength()) + " floats; the step returns " + std::to_string(n));
    }
    fill(out.Data(), n);
    return Napi::Float32Array::New(env, n, out.ArrayBuffer(), out.ByteOffset());
  }
  auto fresh = Napi::Float32Array::New(env, n);
  fill(n > 0 ? fresh.Data() : nullptr, n);
  return fresh;
}

class NativeEngine : public Napi::ObjectWrap<NativeEngine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeEngine",
                       {InstanceMethod("setTensor", &NativeEngine::SetTensor), InstanceMethod("finalize", &NativeEngine::Finalize),
                        InstanceMethod("step", &NativeEngine::Step), InstanceMethod("beginStep", &NativeEngine::BeginStep),
                        InstanceMethod("attention", &NativeEngine::Attention), InstanceMethod("experts", &NativeEngine::Experts),
                        InstanceMethod("expertsPart", &NativeEngine::ExpertsPart),
                        InstanceMethod("endStep", &NativeEngine::EndStep), InstanceMethod("route", &NativeEngine::Route),
                        InstanceMethod("info", &NativeEngine::Info), InstanceMethod("takeProfile", &NativeEngine::TakeProfile),
                        InstanceMethod("predictRouter", &NativeEngine::PredictRouter), InstanceMethod("residual", &NativeEngine::Residual),
                        InstanceMethod("loadExpert", &NativeEngine::LoadExpert), InstanceMethod("cancelLoad", &NativeEngine::CancelLoad),
                        InstanceMethod("evictSlot", &NativeEngine::EvictSlot), InstanceMethod("expertState", &NativeEngine::ExpertState),
                        InstanceMethod("waitExpert", &NativeEngine::WaitExpert), InstanceMethod("storeStats", &NativeEngine::StoreStats),
                        InstanceMethod("gateLoads", &NativeEngine::GateLoads), InstanceMethod("throttleLoads", &NativeEngine::ThrottleLoads),
                        InstanceMethod("close", &NativeEngine::Close)});
  }

  explicit NativeEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeEngine>(info) {
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(info.Env(), "NativeEngine(options) needs an options object");
    const Napi::Object o = info[0].As<Napi::Object>();
    EngineConfig c;
    c.vocab = get_int(o, "vocab", 0, true);
    c.hidden = get_int(o, "hidden", 0, true);
    c.layers = get_int(o, "layers", 0, true);
    c.heads = get_int(o, "heads", 0, true);
    c.kv_heads = get_int(o, "kvHeads", 0, true);
    c.head_dim = get_int(o, "headDim", 0, true);
    c.experts = get_int(o, "experts", 0, true);
    c.top_k = get_int(o, "topK", 0, true);
    c.expert_width = get_int(o, "expertWidth", 0, true);
    c.shared_width = get_int(o, "sharedWidth", 0, false);
    c.renorm_topk = get_bool(o, "renormTopK");
    const std::string qk = o.Get("qkNorm").IsString() ? o.Get("qkNorm").As<Napi::String>().Utf8Value() : "none";
    if (qk == "none") c.qk_norm = QkNorm::None;
    else if (qk == "per_head") c.qk_norm = QkNorm::PerHead;
    else if (qk == "full") c.qk_norm = QkNorm::Full;
    else throw std::invalid_argument("qkNorm must be none, per_head or full");
    c.qkv_bias = get_bool(o, "qkvBias");
    c.tie_embeddings = get_bool(o, "tieEmbeddings");
    c.rms_eps = static_cast<float>(get_num(o, "rmsEps", 1e-6));
    c.rope_theta = static_cast<float>(get_num(o, "ropeTheta", 10000));
    c.max_positions = get_int(o, "maxPositions", 4096, false);
    const std::string wt = o.Get("weights").IsString() ? o.Get("weights").As<Napi::String>().Utf8Value() : "f32";
    if (!wtype_from_name(wt, &c.wtype)) throw std::invalid_argument("unknown weight format " + wt);
    c.threads = static_cast<int>(get_int(o, "threads", 1, false));
    c.kv_block_size = get_int(o, "kvBlockSize", 16, false);
    c.kv_blocks = get_int(o, "kvBlocks", 0, true);
    const Napi::Value kvt = o.Get("kvCacheType");
    if (!kvt.IsUndefined()) {
      const std::string v = kvt.IsString() ? kvt.As<Napi::String>().Utf8Value() : "";
      if (v != "f32" && v != "f16") throw std::invalid_argument("engine option kvCacheType must be f32 or f16");
      c.kv_f16 = v == "f16";
    }
    const Napi::Value off = o.Get("offload");
    if (!off.IsUndefined() && !off.IsNull()) {
      if (!off.IsObject()) throw std::invalid_argument("engine option offload must be an object {file, slotsPerLayer (number or one per layer), ioThreads?, direct?}");
      const Napi::Object oo = off.As<Napi::Object>();
      if (!oo.Get("file").IsString()) throw std::invalid_argument("engine option offload.file must be a string");
      c.offload_file = oo.Get("file").As<Napi::String>().Utf8Value();
      if (c.offload_file.empty()) throw std::invalid_argument("engine option offload.file must not be empty");
      c.offload_slots = get_slots(oo, c.layers, c.experts);
      const int64_t io = get_int(oo, "ioThreads", 2, false);
      if (io < 1 || io > 64) throw std::invalid_argument("engine option offload.ioThreads must be in 1..64, got " + std::to_string(io));
      c.offload_io_threads = static_cast<int>(io);
      const Napi::Value d = oo.Get("direct");
      if (!d.IsUndefined() && !d.IsBoolean()) throw std::invalid_argument("engine option offload.direct must be a boolean");
      c.offload_direct = d.IsUndefined() || d.As<Napi::Boolean>().Value();
    }
    engine_ = std::make_unique<Engine>(c);
  }

 private:
  Engine& engine() {
    if (!engine_) throw std::logic_error("the engine is closed");
    return *engine_;
  }

  // setTensor(role, layer, expert, bytes: Uint8Array, dtype: 'F32'|'F16'|'BF16', rows, cols)
  Napi::Value SetTensor(const Napi::CallbackInfo& info) {
    if (info.Length() < 7) throw std::invalid_argument("setTensor(role, layer, expert, bytes, dtype, rows, cols)");
    const std::string role = info[0].As<Napi::String>().Utf8Value();
    const int64_t layer = info[1].As<Napi::Number>().Int64Value();
    const int64_t expert = info[2].As<Napi::Number>().Int64Value();
    auto bytes = typed<Napi::Uint8Array>(info[3], "bytes");
    const std::string dtype = info[4].As<Napi::String>().Utf8Value();
    const int64_t rows = info[5].As<Napi::Number>().Int64Value();
    const int64_t cols = info[6].As<Napi::Number>().Int64Value();
    WType src;
    if (dtype == "F32") src = WType::F32;
    else if (dtype == "F16") src = WType::F16;
    else if (dtype == "BF16") src = WType::BF16;
    else throw std::invalid_argument("tensor dtype " + dtype + " is not supported (F32, F16, BF16)");
    if (rows <= 0 || cols <= 0) throw std::invalid_argument("tensor " + role + " has an empty shape");
    if (bytes.ByteLength() != row_bytes(src, cols) * static_cast<size_t>(rows)) throw std::invalid_argument("tensor " + role + ": byte length does not match its shape");
    engine().set_tensor(role, layer, expert, bytes.Data(), src, rows, cols);
    return info.Env().Undefined();
  }

  Napi::Value Finalize(const Napi::CallbackInfo& info) {
    engine().finalize();
    return info.Env().Undefined();
  }

  Napi::Value Step(const Napi::CallbackInfo& info) {
    std::vector<int32_t> tokens;
    std::vector<SeqSlice> seqs;
    read_batch(info, tokens, seqs);
    Engine& e = engine();
    const size_t n = static_cast<size_t>(Engine::logit_rows(seqs) * e.config().vocab);
    return logits_to_js(info, 3, n, [&](float* out, size_t len) { e.step(tokens, seqs, out, len); });
  }

  Napi::Value BeginStep(const Napi::CallbackInfo& info) {
    std::vector<int32_t> tokens;
    std::vector<SeqSlice> seqs;
    read_batch(info, tokens, seqs);
    engine().begin_step(tokens, seqs);
    return info.Env().Undefined();
  }

  Napi::Value Attention(const Napi::CallbackInfo& info) {
    return to_js(info.Env(), engine().attention(arg_int(info, 0, "attention: layer")));
  }

  // experts(layer, ids: Int32Array (T*k), weights: Float32Array (T*k), k)
  Napi::Value Experts(const Napi::CallbackInfo& info) {
    RunExperts(info, false);
    return info.Env().Undefined();
  }

  // expertsPart(layer, ids, weights, k, subset: Int32Array) → experts of the layer still to run
  Napi::Value ExpertsPart(const Napi::CallbackInfo& info) {
    if (info.Length() < 5) throw std::invalid_argument("expertsPart(layer, ids, weights, k, subset)");
    return Napi::Number::New(info.Env(), static_cast<double>(RunExperts(info, true)));
  }

  int64_t RunExperts(const Napi::CallbackInfo& info, bool part) {
    if (info.Length() < 4) throw std::invalid_argument("experts(layer, ids, weights, k)");
    const int64_t layer = arg_int(info, 0, "experts: layer");
    auto ids = typed<Napi::Int32Array>(info[1], "ids");
    auto w = typed<Napi::Float32Array>(info[2], "weights");
    const int64_t k = arg_int(info, 3, "experts: k");
    if (k <= 0 || ids.ElementLength() != w.ElementLength()) throw std::invalid_argument("experts: ids and weights must both hold k entries per token");
    const int32_t* subset = nullptr;
    int64_t n_subset = 0;
    if (part) {
      auto sub = typed<Napi::Int32Array>(info[4], "subset");
      subset = sub.Data();
      n_subset = static_cast<int64_t>(sub.ElementLength());
      // An empty subset still runs the shared expert with the first part; a zero-length
      // typed array may have no data pointer.
      static const int32_t kNone = 0;
      if (subset == nullptr) subset = &kNone;
    }
    return engine().experts(layer, ids.Data(), w.Data(), static_cast<int64_t>(ids.ElementLength()), k, subset, n_subset);
  }

  // predictRouter(from, to) → Float32Array (to - from, T, experts)
  Napi::Value PredictRouter(const Napi::CallbackInfo& info) {
    const int64_t from = arg_int(info, 0, "predictRouter: from");
    const int64_t to = arg_int(info, 1, "predictRouter: to");
    std::vector<float> out;
    engine().predict_router(from, to, out);
    return to_js(info.Env(), out);
  }

  Napi::Value Residual(const Napi::CallbackInfo& info) { return to_js(info.Env(), engine().residual()); }

  Napi::Value LoadExpert(const Napi::CallbackInfo& info) {
    const int64_t layer = arg_int(info, 0, "loadExpert: layer");
    const int64_t expert = arg_int(info, 1, "loadExpert: expert");
    const int64_t slot = arg_int(info, 2, "loadExpert: slot");
    int64_t priority = 0;
    if (info.Length() > 3 && !info[3].IsUndefined()) priority = arg_int(info, 3, "loadExpert: priority");
    if (priority < 0 || priority > 1000000) throw std::invalid_argument("loadExpert: priority must be an integer in [0, 1000000]");
    engine().store().load(layer, expert, slot, static_cast<int>(priority));
    return info.Env().Undefined();
  }

  Napi::Value CancelLoad(const Napi::CallbackInfo& info) {
    const int64_t layer = arg_int(info, 0, "cancelLoad: layer");
    const int64_t expert = arg_int(info, 1, "cancelLoad: expert");
    return Napi::Boolean::New(info.Env(), engine().store().cancel(layer, expert));
  }

  Napi::Value EvictSlot(const Napi::CallbackInfo& info) {
    const int64_t layer = arg_int(info, 0, "evictSlot: layer");
    const int64_t slot = arg_int(info, 1, "evictSlot: slot");
    engine().store().evict(layer, slot);
    return info.Env().Undefined();
  }

  Napi::Value ExpertState(const Napi::CallbackInfo& info) {
    const int64_t layer = arg_int(info, 0, "expertState: layer");
    const int64_t expert = arg_int(info, 1, "expertState: expert");
    return Napi::Number::New(info.Env(), engine().store().state(layer, expert));
  }

  Napi::Value WaitExpert(const Napi::CallbackInfo& info) {
    const int64_t layer = arg_int(info, 0, "waitExpert: layer");
    const int64_t expert = arg_int(info, 1, "waitExpert: expert");
    return Napi::Number::New(info.Env(), engine().store().wait(layer, expert));
  }

  Napi::Value GateLoads(const Napi::CallbackInfo& info) {
    engine().store().gate(arg_int(info, 0, "gateLoads: n"));
    return info.Env().Undefined();
  }

  Napi::Value ThrottleLoads(const Napi::CallbackInfo& info) {
    const double ms = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
    if (!(ms >= 0 && ms <= 10000)) throw std::invalid_argument("throttleLoads: ms must be a number in 0..10000");
    engine().store().throttle(ms / 1000);
    return info.Env().Undefined();
  }

  Napi::Value StoreStats(const Napi::CallbackInfo& info) {
    ExpertStore& st = engine().store();
    const moe::StoreStats s = st.stats();
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("loads", static_cast<double>(s.loads));
    o.Set("bytesRead", static_cast<double>(s.bytes_read));
    o.Set("busySeconds", s.busy_seconds);
    o.Set("readSeconds", s.read_seconds);
    auto stall = Napi::Float64Array::New(env, s.stall_seconds.size());
    std::copy(s.stall_seconds.begin(), s.stall_seconds.end(), stall.Data());
    o.Set("stallSeconds", stall);
    o.Set("cancelled", static_cast<double>(s.cancelled));
    o.Set("discarded", static_cast<double>(s.discarded));
    o.Set("failed", static_cast<double>(s.failed));
    o.Set("paused", static_cast<double>(s.paused));
    o.Set("abandoned", static_cast<double>(s.abandoned));
    o.Set("direct", s.direct);
    o.Set("slotBytes", static_cast<double>(st.slot_bytes()));
    return o;
  }

  Napi::Value EndStep(const Napi::CallbackInfo& info) {
    Engine& e = engine();
    const size_t n = static_cast<size_t>(e.logit_rows() * e.config().vocab);
    return logits_to_js(info, 0, n, [&](float* out, size_t len) { e.end_step(out, len); });
  }

  // route(routerLogits: Float32Array (T*E), T) → {ids: Int32Array, weights: Float32Array}
  Napi::Value Route(const Napi::CallbackInfo& info) {
    auto logits = typed<Napi::Float32Array>(info[0], "routerLogits");
    const int64_t T = info[1].As<Napi::Number>().Int64Value();
    const EngineConfig& c = engine().config();
    if (T < 0 || logits.ElementLength() != static_cast<size_t>(T * c.experts)) throw std::invalid_argument("route: expected T * experts logits");
    auto ids = Napi::Int32Array::New(info.Env(), static_cast<size_t>(T * c.top_k));
    auto w = Napi::Float32Array::New(info.Env(), static_cast<size_t>(T * c.top_k));
    engine().route(logits.Data(), T, ids.Data(), w.Data());
    Napi::Object out = Napi::Object::New(info.Env());
    out.Set("ids", ids);
    out.Set("weights", w);
    return out;
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    Engine& e = engine();
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("weightBytes", static_cast<double>(e.weight_bytes()));
    o.Set("kvBytes", static_cast<double>(e.kv_bytes()));
    o.Set("expertBytes", static_cast<double>(e.expert_bytes()));
    o.Set("weights", wtype_name(e.config().wtype));
    o.Set("isa", isa_name(active_isa()));
    o.Set("threads", e.config().threads);
    o.Set("offload", e.offload());
    return o;
  }

  // Milliseconds per phase since the last call (zeros unless MOE_SERVE_PROFILE=1).
  Napi::Value TakeProfile(const Napi::CallbackInfo& info) {
    const auto p = engine().take_profile();
    Napi::Object o = Napi::Object::New(info.Env());
    for (int i = 0; i < Engine::kPhases; i++) o.Set(Engine::phase_name(i), p[static_cast<size_t>(i)]);
    return o;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    engine_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<Engine> engine_;
};

}  // namespace

void RegisterEngine(Napi::Env env, Napi::Object exports) { exports.Set("NativeEngine", NativeEngine::Define(env)); }

}  // namespace moe
