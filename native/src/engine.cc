#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "vecops.h"

namespace moe {

namespace {

// Rows per work item of an expert's matrix product: about 1 MiB of weights, a multiple of
// the kernels' 8-row blocking. Each item is one kernel call that ramps its prefetch up from
// a cold start, so items of 64 KiB (the earlier size) spent a good part of a decode step
// in those ramps; at 1 MiB a decode layer of top-8 Qwen3-30B-A3B experts still makes ~40
// items for the threads to share (A/B on decode, same process pairs: 1 MiB 25-53 tok/s
// against 64 KiB 18-46 tok/s at the same probe bandwidth; 4 MiB was worse).
int64_t rows_per_item(const WMat& w) {
  constexpr int64_t kItemBytes = int64_t{1} << 20;
  const int64_t rb = static_cast<int64_t>(row_bytes(w.type, w.cols));
  return std::max<int64_t>(8, (kItemBytes / std::max<int64_t>(rb, 1)) / 8 * 8);
}

std::string fmt(const char* what, int64_t a, int64_t b) {
  return std::string(what) + " (" + std::to_string(a) + " vs " + std::to_string(b) + ")";
}

void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  // Eight partial sums: one chain of double additions was bound by their latency.
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i0 = 0;
  for (; i0 + 8 <= n; i0 += 8) {
    for (int j = 0; j < 8; j++) part[j] += static_cast<double>(x[i0 + j]) * x[i0 + j];
  }
  for (; i0 < n; i0++) part[0] += static_cast<double>(x[i0]) * x[i0];
  const double ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
  for (int64_t i = 0; i < n; i++) y[i] = w[i] * static_cast<float>(x[i] * inv);
}

}  // namespace

void OwnedMat::alloc(WType t, int64_t rows, int64_t cols) {
  bytes = HostBuffer(row_bytes(t, cols) * static_cast<size_t>(rows));
  m = WMat{t, rows, cols, bytes.data()};
}

Engine::Engine(const EngineConfig& cfg) : cfg_(cfg) {
  const auto positive = [](int64_t v, const char* name) {
    if (v <= 0) throw std::invalid_argument(std::string(name) + " must be positive, got " + std::to_string(v));
  };
  positive(cfg.vocab, "vocab");
  positive(cfg.hidden, "hidden");
  positive(cfg.layers, "layers");
  positive(cfg.heads, "heads");
  positive(cfg.kv_heads, "kv_heads");
  positive(cfg.head_dim, "head_dim");
  positive(cfg.experts, "experts");
  positive(cfg.top_k, "top_k");
  positive(cfg.expert_width, "expert_width");
  positive(cfg.kv_block_size, "kv_block_size");
  positive(cfg.kv_blocks, "kv_blocks");
  positive(cfg.threads, "threads");
  if (cfg.heads % cfg.kv_heads != 0) throw std::invalid_argument(fmt("heads must be a multiple of kv_heads", cfg.heads, cfg.kv_heads));
  if (cfg.top_k > cfg.experts) throw std::invalid_argument(fmt("top_k exceeds experts", cfg.top_k, cfg.experts));
  if (cfg.head_dim % 2 != 0) throw std::invalid_argument("head_dim must be even");
  const int64_t bc = block_cols(cfg.wtype);
  const int64_t q_dim = cfg.heads * cfg.head_dim;
  for (int64_t c : {cfg.hidden, q_dim, cfg.expert_width, cfg.shared_width}) {
    if (c % bc != 0) {
      throw std::invalid_argument(std::string("weights ") + wtype_name(cfg.wtype) + " need every matrix width to be a multiple of " +
                                  std::to_string(bc) + ", got " + std::to_string(c));
    }
  }
  pool_ = std::make_unique<ThreadPool>(cfg.threads);
  for (int64_t i = 0; i < cfg.head_dim / 2; i++) {
    rope_inv_freq_.push_back(1.0 / std::pow(static_cast<double>(cfg.rope_theta), static_cast<double>(2 * i) / static_cast<double>(cfg.head_dim)));
  }
  const char* prof = std::getenv("MOE_SERVE_PROFILE");
  profiling_ = prof != nullptr && std::string(prof) == "1";
  layers_.resize(static_cast<size_t>(cfg.layers));
  const int64_t kv_dim = cfg.kv_heads * cfg.head_dim;
  const size_t kv_elems = static_cast<size_t>(cfg.kv_blocks * cfg.kv_block_size * kv_dim);
  const size_t kv_elem_bytes = cfg.kv_f16 ? 2 : 4;
  for (int64_t l = 0; l < cfg.layers; l++) {
    k_cache_.emplace_back(kv_elems * kv_elem_bytes);
    v_cache_.emplace_back(kv_elems * kv_elem_bytes);
  }
  // The KV cache is backed now, not page by page as steps first write it (those faults
  // cost a 512-token prompt about 30 ms on the Qwen3-30B-A3B shape).
  constexpr size_t kPrefaultChunk = 8u << 20;
  const size_t kv_bytes = kv_elems * kv_elem_bytes;
  const int64_t chunks = static_cast<int64_t>((kv_bytes + kPrefaultChunk - 1) / kPrefaultChunk);
  pool_->parallel_for(2 * cfg.layers * chunks, 1, [&](int64_t item, int) {
    const int64_t buf = item / chunks;
    const size_t from = static_cast<size_t>(item % chunks) * kPrefaultChunk;
    HostBuffer& b = (buf % 2 == 0 ? k_cache_ : v_cache_)[static_cast<size_t>(buf / 2)];
    b.prefault(from, from + kPrefaultChunk);
  });
  for (auto& l : layers_) {
    l.experts.resize(static_cast<size_t>(cfg.experts));
  }
  if (!cfg.offload_slots.empty()) {
    StoreConfig sc;
    sc.file = cfg.offload_file;
    sc.layers = cfg.layers;
    sc.experts = cfg.experts;
    sc.slots = cfg.offload_slots;
    sc.expert_bytes = expert_bytes();
    sc.io_threads = cfg.offload_io_threads;
    sc.direct = cfg.offload_direct;
    // The store checks the slots (one count per layer, each in 1..experts) before any is used.
    store_ = std::make_unique<ExpertStore>(sc);
    // Each slot seen as an expert: the same layout as a resident expert's buffer.
    const size_t gu = row_bytes(cfg.wtype, cfg.hidden) * static_cast<size_t>(2 * cfg.expert_width);
    for (int64_t l = 0; l < cfg.layers; l++) {
      LayerWeights& L = layers_[static_cast<size_t>(l)];
      const int64_t n = store_->slots(l);
      L.slot_views.resize(static_cast<size_t>(n));
      for (int64_t s = 0; s < n; s++) {
        const uint8_t* p = store_->slot_data(l, s);
        L.slot_views[static_cast<size_t>(s)].gate_up = WMat{cfg.wtype, 2 * cfg.expert_width, cfg.hidden, p};
        L.slot_views[static_cast<size_t>(s)].down = WMat{cfg.wtype, cfg.hidden, cfg.expert_width, p + gu};
      }
    }
  }
}

ExpertStore& Engine::store() {
  if (!store_) throw std::logic_error("this engine does not offload experts (no offload option)");
  return *store_;
}

Engine::~Engine() = default;

enum Phase { kEmbed, kQkv, kRopeKv, kAttn, kOProj, kRouter, kMoePrep, kGateUp, kAct, kDown, kCombine, kLmHead };

const char* Engine::phase_name(int phase) {
  static const char* names[kPhases] = {"embed", "qkv", "rope_kv", "attention", "o_proj", "router", "moe_prep", "gate_up", "act", "down", "combine", "lm_head"};
  return phase >= 0 && phase < kPhases ? names[phase] : "?";
}

void Engine::mark(int phase) {
  if (!profiling_) return;
  const auto now = std::chrono::steady_clock::now();
  if (phase >= 0) prof_[static_cast<size_t>(phase)] += std::chrono::duration<double, std::milli>(now - prof_t_).count();
  prof_t_ = now;
}

std::array<double, Engine::kPhases> Engine::take_profile() {
  const auto out = prof_;
  prof_.fill(0.0);
  return out;
}

namespace {

// Packs rows of float32 into `dst` (already sized) in the given format.
// Converts rows stored as `st` into the engine's format `t`, a chunk of rows per work item,
// so that loading uses every thread and never holds a whole matrix in float32.
void pack_rows(ThreadPool& pool, WType t, const uint8_t* src, WType st, int64_t rows, int64_t cols, uint8_t* dst) {
  constexpr int64_t kRows = 64;
  const size_t srb = row_bytes(st, cols), drb = row_bytes(t, cols);
  pool.parallel_for((rows + kRows - 1) / kRows, 1, [&](int64_t i, int) {
    thread_local std::vector<float> buf;
    const int64_t r0 = i * kRows, n = std::min(kRows, rows - r0);
    buf.resize(static_cast<size_t>(n * cols));
    for (int64_t r = 0; r < n; r++) dequantize_row(st, src + srb * static_cast<size_t>(r0 + r), cols, buf.data() + r * cols);
    quantize_rows(t, buf.data(), n, cols, dst + drb * static_cast<size_t>(r0));
  });
}

std::vector<float> to_f32(const uint8_t* src, WType st, int64_t rows, int64_t cols) {
  std::vector<float> out(static_cast<size_t>(rows * cols));
  const size_t srb = row_bytes(st, cols);
  for (int64_t r = 0; r < rows; r++) dequantize_row(st, src + srb * static_cast<size_t>(r), cols, out.data() + r * cols);
  return out;
}

size_t packed_expert_bytes(WType t, int64_t width, int64_t hidden) {
  return row_bytes(t, hidden) * static_cast<size_t>(2 * width) + row_bytes(t, width) * static_cast<size_t>(hidden);
}

// The expert's matrices as views of `base` (packed_expert_bytes(t, width, hidden) bytes).
void expert_views(ExpertMat& e, WType t, int64_t width, int64_t hidden, uint8_t* base) {
  const size_t gu = row_bytes(t, hidden) * static_cast<size_t>(2 * width);
  e.gate_up = WMat{t, 2 * width, hidden, base};
  e.down = WMat{t, hidden, width, base + gu};
}

void expert_alloc(ExpertMat& e, WType t, int64_t width, int64_t hidden) {
  e.bytes = HostBuffer(packed_expert_bytes(t, width, hidden));
  expert_views(e, t, width, hidden, e.bytes.data());
}

}  // namespace

void Engine::set_tensor(const std::string& role, int64_t layer, int64_t expert, const uint8_t* src, WType st, int64_t rows, int64_t cols) {
  const EngineConfig& c = cfg_;
  const int64_t H = c.hidden;
  const int64_t q_dim = c.heads * c.head_dim;
  const int64_t kv_dim = c.kv_heads * c.head_dim;
  const auto expect = [&](int64_t r, int64_t co) {
    if (rows != r || cols != co) {
      throw std::invalid_argument("tensor " + role + " of layer " + std::to_string(layer) + ": shape [" + std::to_string(rows) + ", " +
                                  std::to_string(cols) + "], expected [" + std::to_string(r) + ", " + std::to_string(co) + "]");
    }
  };
  const auto vec = [&](std::vector<float>& dst, int64_t n) {
    expect(1, n);
    dst = to_f32(src, st, 1, n);
  };
  ready_ = false;
  if (role == "embed") {
    expect(c.vocab, H);
    embed_.alloc(dense_wtype(), c.vocab, H);
    pack_rows(*pool_, dense_wtype(), src, st, rows, cols, embed_.bytes.data());
    return;
  }
  if (role == "lm_head") {
    expect(c.vocab, H);
    lm_head_.alloc(dense_wtype(), c.vocab, H);
    pack_rows(*pool_, dense_wtype(), src, st, rows, cols, lm_head_.bytes.data());
    return;
  }
  if (role == "final_norm") return vec(final_norm_, H);
  if (layer < 0 || layer >= c.layers) throw std::invalid_argument("tensor " + role + ": layer " + std::to_string(layer) + " out of range");
  LayerWeights& L = layers_[static_cast<size_t>(layer)];
  const int64_t qkv_rows = q_dim + 2 * kv_dim;
  if (role == "input_norm") return vec(L.input_norm, H);
  if (role == "post_norm") return vec(L.post_norm, H);
  if (role == "q" || role == "k" || role == "v") {
    const int64_t off = role == "q" ? 0 : role == "k" ? q_dim : q_dim + kv_dim;
    expect(role == "q" ? q_dim : kv_dim, H);
    if (L.qkv.m.rows != qkv_rows) L.qkv.alloc(dense_wtype(), qkv_rows, H);
    pack_rows(*pool_, dense_wtype(), src, st, rows, cols, L.qkv.bytes.data() + row_bytes(dense_wtype(), H) * static_cast<size_t>(off));
    return;
  }
  if (role == "q_bias" || role == "k_bias" || role == "v_bias") {
    const int64_t off = role == "q_bias" ? 0 : role == "k_bias" ? q_dim : q_dim + kv_dim;
    expect(1, role == "q_bias" ? q_dim : kv_dim);
    L.qkv_bias.resize(static_cast<size_t>(qkv_rows), 0.f);
    const std::vector<float> b = to_f32(src, st, 1, cols);
    std::copy(b.begin(), b.end(), L.qkv_bias.begin() + off);
    return;
  }
  if (role == "o") {
    expect(H, q_dim);
    L.o.alloc(dense_wtype(), H, q_dim);
    pack_rows(*pool_, dense_wtype(), src, st, rows, cols, L.o.bytes.data());
    return;
  }
  if (role == "q_norm") return vec(L.q_norm, c.qk_norm == QkNorm::PerHead ? c.head_dim : q_dim);
  if (role == "k_norm") return vec(L.k_norm, c.qk_norm == QkNorm::PerHead ? c.head_dim : kv_dim);
  if (role == "router") {
    expect(c.experts, H);
    L.router = to_f32(src, st, rows, cols);
    if (H % block_cols(WType::Q8_0) == 0) {
      L.router_q8.resize(row_bytes(WType::Q8_0, H) * static_cast<size_t>(c.experts));
      quantize_rows(WType::Q8_0, L.router.data(), c.experts, H, L.router_q8.data());
    } else {
      L.router_q8.clear();
    }
    return;
  }
  if (role == "shared_gate_scalar") return vec(L.shared_gate, H);
  if (role == "gate" || role == "up" || role == "down") {
    const bool shared = expert == -1;
    if (shared && c.shared_width == 0) throw std::invalid_argument("this model has no shared expert");
    if (!shared && (expert < 0 || expert >= c.experts)) throw std::invalid_argument("expert " + std::to_string(expert) + " out of range");
    const int64_t W = shared ? c.shared_width : c.expert_width;
    const size_t gu = row_bytes(c.wtype, H) * static_cast<size_t>(2 * W);
    const size_t off = role == "down" ? gu : role == "up" ? row_bytes(c.wtype, H) * static_cast<size_t>(W) : 0;
    if (role == "down") expect(H, W);
    else expect(W, H);
    if (!shared && store_) {
      // Offloading: packed into the expert's staging record exactly as into a resident
      // expert's buffer; the store writes it to the file once its three parts are in.
      uint8_t* base = store_->staging(layer, expert);
      pack_rows(*pool_, c.wtype, src, st, rows, cols, base + off);
      store_->part_done(layer, expert, role == "gate" ? 0 : role == "up" ? 1 : 2);
      return;
    }
    if (shared) {
      ExpertMat& e = L.shared;
      if (e.bytes.empty()) expert_alloc(e, c.wtype, W, H);
      pack_rows(*pool_, c.wtype, src, st, rows, cols, e.bytes.data() + off);
      e.present = true;
      return;
    }
    // Routed experts share one arena per layer: separate mappings of ~5 MB each got huge
    // pages for only about 60% of their bytes, and the rest streams through 4 KB pages.
    const size_t eb = packed_expert_bytes(c.wtype, W, H);
    if (L.expert_arena.empty()) {
      L.expert_arena = HostBuffer(eb * static_cast<size_t>(c.experts));
      for (int64_t x = 0; x < c.experts; x++) expert_views(L.experts[static_cast<size_t>(x)], c.wtype, W, H, L.expert_arena.data() + eb * static_cast<size_t>(x));
    }
    ExpertMat& e = L.experts[static_cast<size_t>(expert)];
    pack_rows(*pool_, c.wtype, src, st, rows, cols, L.expert_arena.data() + eb * static_cast<size_t>(expert) + off);
    e.present = true;
    return;
  }
  throw std::invalid_argument("unknown tensor role " + role);
}

void Engine::finalize() {
  const EngineConfig& c = cfg_;
  const auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("missing tensor: " + what);
  };
  need(!embed_.bytes.empty(), "embed");
  need(!lm_head_.bytes.empty() || c.tie_embeddings, "lm_head");
  need(!final_norm_.empty(), "final_norm");
  for (int64_t l = 0; l < c.layers; l++) {
    const LayerWeights& L = layers_[static_cast<size_t>(l)];
    const std::string p = "layer " + std::to_string(l) + " ";
    need(!L.input_norm.empty(), p + "input_norm");
    need(!L.post_norm.empty(), p + "post_norm");
    need(!L.qkv.bytes.empty(), p + "q/k/v");
    need(!L.o.bytes.empty(), p + "o");
    need(!L.router.empty(), p + "router");
    need(!c.qkv_bias || !L.qkv_bias.empty(), p + "q/k/v bias");
    need(c.qk_norm == QkNorm::None || (!L.q_norm.empty() && !L.k_norm.empty()), p + "q/k norm");
    for (int64_t e = 0; e < c.experts; e++) {
      need(store_ ? store_->written(l, e) : L.experts[static_cast<size_t>(e)].present, p + "expert " + std::to_string(e));
    }
    need(c.shared_width == 0 || (!L.shared.bytes.empty() && !L.shared_gate.empty()), p + "shared expert");
  }
  if (store_) store_->finish_writes();
  ready_ = true;
}

void Engine::check_ready() const {
  if (!ready_) throw std::logic_error("the engine's weights are not finalized");
}

size_t Engine::weight_bytes() const {
  size_t b = embed_.size_bytes() + (cfg_.tie_embeddings ? 0 : lm_head_.size_bytes()) + final_norm_.size() * 4;
  for (const auto& L : layers_) {
    b += (L.input_norm.size() + L.post_norm.size() + L.qkv_bias.size() + L.q_norm.size() + L.k_norm.size() + L.router.size() + L.shared_gate.size()) * 4;
    b += L.qkv.size_bytes() + L.o.size_bytes() + L.shared.bytes.size() + L.router_q8.size();
    b += L.expert_arena.size();  // none when offloading
  }
  if (store_) b += store_->arena_bytes();
  return b;
}

size_t Engine::kv_bytes() const {
  size_t b = 0;
  for (const auto& k : k_cache_) b += k.size();
  for (const auto& v : v_cache_) b += v.size();
  return b;
}

size_t Engine::expert_bytes() const {
  return row_bytes(cfg_.wtype, cfg_.hidden) * static_cast<size_t>(2 * cfg_.expert_width) +
         row_bytes(cfg_.wtype, cfg_.expert_width) * static_cast<size_t>(cfg_.hidden);
}

// ---------------------------------------------------------------------------------
// The step

void Engine::begin_step(const std::vector<int32_t>& tokens, const std::vector<SeqSlice>& seqs) {
  check_ready();
  in_step_ = false;
  const int64_t T = static_cast<int64_t>(tokens.size());
  if (T == 0) throw std::invalid_argument("a step needs at least one token");
  int64_t covered = 0;
  pos_.assign(static_cast<size_t>(T), 0);
  seq_of_.assign(static_cast<size_t>(T), 0);
  for (size_t s = 0; s < seqs.size(); s++) {
    const SeqSlice& q = seqs[s];
    if (q.n_tokens <= 0) throw std::invalid_argument("sequence " + std::to_string(s) + " has no new tokens");
    if (q.token_offset != covered) throw std::invalid_argument("sequence slices must cover the tokens in order");
    if (q.start_pos < 0 || q.start_pos + q.n_tokens > cfg_.max_positions) {
      throw std::invalid_argument("sequence " + std::to_string(s) + " reaches position " + std::to_string(q.start_pos + q.n_tokens) +
                                  " beyond the context of " + std::to_string(cfg_.max_positions));
    }
    const int64_t need = (q.start_pos + q.n_tokens + cfg_.kv_block_size - 1) / cfg_.kv_block_size;
    if (static_cast<int64_t>(q.blocks.size()) < need) {
      throw std::invalid_argument("sequence " + std::to_string(s) + " has " + std::to_string(q.blocks.size()) + " KV blocks for " +
                                  std::to_string(q.start_pos + q.n_tokens) + " positions");
    }
    for (int64_t i = 0; i < need; i++) {
      const int32_t b = q.blocks[static_cast<size_t>(i)];
      if (b < 0 || b >= cfg_.kv_blocks) throw std::invalid_argument("KV block id " + std::to_string(b) + " out of range");
    }
    for (int64_t i = 0; i < q.n_tokens; i++) {
      pos_[static_cast<size_t>(covered + i)] = q.start_pos + i;
      seq_of_[static_cast<size_t>(covered + i)] = static_cast<int64_t>(s);
    }
    covered += q.n_tokens;
  }
  if (covered != T) throw std::invalid_argument(fmt("sequence slices do not cover the tokens", covered, T));
  for (int32_t t : tokens) {
    if (t < 0 || t >= cfg_.vocab) throw std::invalid_argument("token id " + std::to_string(t) + " outside the vocabulary");
  }
  seqs_ = seqs;
  moe_open_ = false;
  mark(-1);
  embed(tokens);
  mark(kEmbed);
  phase_layer_ = 0;
  phase_attended_ = false;
  in_step_ = true;
}

void Engine::embed(const std::vector<int32_t>& tokens) {
  const int64_t T = static_cast<int64_t>(tokens.size());
  const int64_t H = cfg_.hidden;
  x_.assign(static_cast<size_t>(T * H), 0.f);
  const size_t rb = row_bytes(dense_wtype(), H);
  pool_->parallel_for(T, 16, [&](int64_t t, int) {
    dequantize_row(dense_wtype(), embed_.m.data + rb * static_cast<size_t>(tokens[static_cast<size_t>(t)]), H, x_.data() + t * H);
  });
}

const std::vector<float>& Engine::attention(int64_t layer) {
  check_ready();
  if (!in_step_) throw std::logic_error("attention() outside a step: call beginStep first");
  if (layer != phase_layer_ || phase_attended_) {
    throw std::logic_error("attention(" + std::to_string(layer) + ") out of order: layer " + std::to_string(phase_layer_) + " is next" +
                           (phase_attended_ ? " and needs experts() first" : ""));
  }
  attention_block(layer);
  phase_attended_ = true;
  return router_logits_;
}

void Engine::attention_block(int64_t layer) {
  const EngineConfig& c = cfg_;
  const LayerWeights& L = layers_[static_cast<size_t>(layer)];
  const int64_t T = static_cast<int64_t>(pos_.size());
  const int64_t H = c.hidden, hd = c.head_dim;
  const int64_t q_dim = c.heads * hd, kv_dim = c.kv_heads * hd, qkv_dim = q_dim + 2 * kv_dim;
  const VecOps& ops = vecops();

  xn_.resize(static_cast<size_t>(T * H));
  pool_->parallel_for(T, 8, [&](int64_t t, int) { rms_norm_row(x_.data() + t * H, L.input_norm.data(), H, c.rms_eps, xn_.data() + t * H); });
  prepare_acts(dense_wtype(), xn_.data(), T, H, H, acts_);
  qkv_.resize(static_cast<size_t>(T * qkv_dim));
  matmul_parallel(*pool_, L.qkv.m, acts_, qkv_.data(), qkv_dim);
  mark(kQkv);

  // Bias, q/k norms, rotary embedding; then keys and values into the paged cache.
  uint8_t* kc = k_cache_[static_cast<size_t>(layer)].data();
  uint8_t* vc = v_cache_[static_cast<size_t>(layer)].data();
  const int64_t half = hd / 2;
  if (layer == 0) {
    // The rotation of each token's position, shared by every layer of the step.
    rope_cs_.resize(static_cast<size_t>(T * half * 2));
    pool_->parallel_for(T, 8, [&](int64_t t, int) {
      const double p = static_cast<double>(pos_[static_cast<size_t>(t)]);
      double* cs = rope_cs_.data() + t * half * 2;
      for (int64_t i = 0; i < half; i++) {
        const double ang = p * rope_inv_freq_[static_cast<size_t>(i)];
        cs[i] = std::cos(ang);
        cs[half + i] = std::sin(ang);
      }
    });
  }
  pool_->parallel_for(T, 4, [&](int64_t t, int) {
    float* row = qkv_.data() + t * qkv_dim;
    if (!L.qkv_bias.empty()) {
      for (int64_t i = 0; i < qkv_dim; i++) row[i] += L.qkv_bias[static_cast<size_t>(i)];
    }
    float* q = row;
    float* k = row + q_dim;
    float* v = row + q_dim + kv_dim;
    if (c.qk_norm == QkNorm::Full) {
      rms_norm_row(q, L.q_norm.data(), q_dim, c.rms_eps, q);
      rms_norm_row(k, L.k_norm.data(), kv_dim, c.rms_eps, k);
    } else if (c.qk_norm == QkNorm::PerHead) {
      for (int64_t h = 0; h < c.heads; h++) rms_norm_row(q + h * hd, L.q_norm.data(), hd, c.rms_eps, q + h * hd);
      for (int64_t h = 0; h < c.kv_heads; h++) rms_norm_row(k + h * hd, L.k_norm.data(), hd, c.rms_eps, k + h * hd);
    }
    const double* cs = rope_cs_.data() + t * half * 2;  // cos[half], then sin[half]
    const double* sn = cs + half;
    const auto rotate = [&](float* a) {
      for (int64_t i = 0; i < half; i++) {
        const double x1 = a[i], x2 = a[half + i];
        a[i] = static_cast<float>(x1 * cs[i] - x2 * sn[i]);
        a[half + i] = static_cast<float>(x2 * cs[i] + x1 * sn[i]);
      }
    };
    for (int64_t h = 0; h < c.heads; h++) rotate(q + h * hd);
    for (int64_t h = 0; h < c.kv_heads; h++) rotate(k + h * hd);
    const SeqSlice& s = seqs_[static_cast<size_t>(seq_of_[static_cast<size_t>(t)])];
    const int64_t pos = pos_[static_cast<size_t>(t)];
    const int64_t b = s.blocks[static_cast<size_t>(pos / c.kv_block_size)], i = pos % c.kv_block_size;
    for (int64_t g = 0; g < c.kv_heads; g++) {
      const int64_t ki = kv_key_index(b, g, i, 0, c.kv_heads, hd, c.kv_block_size);
      const int64_t vi = kv_value_index(b, g, i, 0, c.kv_heads, hd, c.kv_block_size);
      if (c.kv_f16) {
        uint16_t* kt = reinterpret_cast<uint16_t*>(kc) + ki;
        uint16_t* vt = reinterpret_cast<uint16_t*>(vc) + vi;
        for (int64_t d = 0; d < hd; d++) kt[d * c.kv_block_size] = f32_to_f16(k[g * hd + d]);
        for (int64_t d = 0; d < hd; d++) vt[d] = f32_to_f16(v[g * hd + d]);
      } else {
        float* kt = reinterpret_cast<float*>(kc) + ki;
        for (int64_t d = 0; d < hd; d++) kt[d * c.kv_block_size] = k[g * hd + d];
        std::memcpy(reinterpret_cast<float*>(vc) + vi, v + g * hd, static_cast<size_t>(hd) * 4);
      }
    }
  });

  mark(kRopeKv);
  // Causal attention over the paged cache (layout: vecops.h): one work item per (token,
  // kv head); the query heads of a group share the keys and values they read.
  attn_.resize(static_cast<size_t>(T * q_dim));
  const int64_t group = c.heads / c.kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  pool_->parallel_for(T * c.kv_heads, 1, [&](int64_t item, int) {
    const int64_t t = item / c.kv_heads, g = item % c.kv_heads;
    const SeqSlice& s = seqs_[static_cast<size_t>(seq_of_[static_cast<size_t>(t)])];
    AttnArgs a;
    a.q = qkv_.data() + t * qkv_dim + g * group * hd;
    a.nq = group;
    a.head_dim = hd;
    a.keys = kc;
    a.values = vc;
    a.f16 = c.kv_f16;
    a.blocks = s.blocks.data();
    a.block_size = c.kv_block_size;
    a.kv_heads = c.kv_heads;
    a.g = g;
    a.visible = pos_[static_cast<size_t>(t)] + 1;
    a.scale = scale;
    a.out = attn_.data() + t * q_dim + g * group * hd;
    ops.attend(a);
  });

  mark(kAttn);
  prepare_acts(dense_wtype(), attn_.data(), T, q_dim, q_dim, acts_);
  proj_.resize(static_cast<size_t>(T * H));
  matmul_parallel(*pool_, L.o.m, acts_, proj_.data(), H);
  for (size_t i = 0; i < x_.size(); i++) x_[i] += proj_[i];
  mark(kOProj);

  // The MoE block's input and the router's logits (float32 router weights, a float32
  // matrix product over all tokens at once).
  router_logits_.resize(static_cast<size_t>(T * c.experts));
  pool_->parallel_for(T, 8, [&](int64_t t, int) { rms_norm_row(x_.data() + t * H, L.post_norm.data(), H, c.rms_eps, xn_.data() + t * H); });
  prepare_acts(WType::F32, xn_.data(), T, H, H, router_acts_);
  matmul_parallel(*pool_, WMat{WType::F32, c.experts, H, reinterpret_cast<const uint8_t*>(L.router.data())}, router_acts_, router_logits_.data(), c.experts);
  mark(kRouter);
}

void Engine::route(const float* logits, int64_t n_tokens, int32_t* ids, float* weights) const {
  const int64_t E = cfg_.experts, k = cfg_.top_k;
  std::vector<double> p(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < n_tokens; t++) {
    const float* l = logits + t * E;
    double mx = -INFINITY;
    for (int64_t e = 0; e < E; e++) mx = std::max(mx, static_cast<double>(l[e]));
    double sum = 0;
    for (int64_t e = 0; e < E; e++) {
      p[static_cast<size_t>(e)] = std::exp(static_cast<double>(l[e]) - mx);
      sum += p[static_cast<size_t>(e)];
    }
    for (int64_t e = 0; e < E; e++) {
      p[static_cast<size_t>(e)] /= sum;
      order[static_cast<size_t>(e)] = static_cast<int32_t>(e);
    }
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)] || (p[static_cast<size_t>(a)] == p[static_cast<size_t>(b)] && a < b);
    });
    double kept = 0;
    for (int64_t i = 0; i < k; i++) kept += p[static_cast<size_t>(order[static_cast<size_t>(i)])];
    for (int64_t i = 0; i < k; i++) {
      const int32_t e = order[static_cast<size_t>(i)];
      ids[t * k + i] = e;
      const double w = p[static_cast<size_t>(e)];
      weights[t * k + i] = static_cast<float>(cfg_.renorm_topk ? w / kept : w);
    }
  }
}

int64_t Engine::experts(int64_t layer, const int32_t* ids, const float* weights, int64_t n, int64_t k, const int32_t* subset, int64_t n_subset) {
  check_ready();
  if (!in_step_ || layer != phase_layer_ || !phase_attended_) {
    throw std::logic_error("experts(" + std::to_string(layer) + ") out of order: call attention(" + std::to_string(layer) + ") first");
  }
  const int64_t T = static_cast<int64_t>(pos_.size());
  if (k <= 0 || n != T * k) throw std::invalid_argument("experts: expected " + std::to_string(T) + " tokens × k assignments, got " + std::to_string(n));
  for (int64_t i = 0; i < T * k; i++) {
    if (ids[i] < 0 || ids[i] >= cfg_.experts) throw std::invalid_argument("expert id " + std::to_string(ids[i]) + " out of range");
  }
  if (moe_open_) {
    // A later part of the layer: the assignments must be the ones the layer started with.
    if (k != moe_k_ || std::memcmp(ids, moe_ids_.data(), static_cast<size_t>(n) * 4) != 0 ||
        std::memcmp(weights, moe_w_.data(), static_cast<size_t>(n) * 4) != 0) {
      throw std::invalid_argument("experts(" + std::to_string(layer) + "): ids and weights differ from those of this layer's first call");
    }
  }
  const bool first = !moe_open_;
  if (first) plan_moe(layer, ids, weights, k);
  try {
    // The jobs to run now: the given experts (or all that remain), the shared expert with the first part.
    std::vector<int32_t> run;
    if (subset == nullptr) {
      for (int64_t j = 0; j < n_jobs_; j++) {
        if (!job_done_[static_cast<size_t>(j)]) run.push_back(static_cast<int32_t>(j));
      }
    } else {
      std::vector<char> picked(static_cast<size_t>(n_jobs_), 0);
      for (int64_t i = 0; i < n_subset; i++) {
        const int32_t e = subset[i];
        if (e < 0 || e >= cfg_.experts) throw std::invalid_argument("experts: subset expert id " + std::to_string(e) + " out of range");
        const int32_t j = job_of_expert_[static_cast<size_t>(e)];
        if (j < 0) throw std::invalid_argument("experts: expert " + std::to_string(e) + " of the subset is not among the layer's assignments");
        if (job_done_[static_cast<size_t>(j)]) throw std::logic_error("experts: expert " + std::to_string(e) + " of layer " + std::to_string(layer) + " already ran in this step");
        if (!picked[static_cast<size_t>(j)]) run.push_back(j);
        picked[static_cast<size_t>(j)] = 1;
      }
      if (shared_job_ >= 0 && !job_done_[static_cast<size_t>(shared_job_)]) run.push_back(static_cast<int32_t>(shared_job_));
      std::sort(run.begin(), run.end());
    }
    const LayerWeights& L = layers_[static_cast<size_t>(layer)];
    if (store_) {
      std::vector<int32_t> routed, slot_of;
      for (int32_t j : run) {
        if (j != shared_job_) routed.push_back(jobs_[static_cast<size_t>(j)].expert);
      }
      slot_of.resize(routed.size());
      store_->acquire(layer, routed.data(), static_cast<int64_t>(routed.size()), slot_of.data());
      size_t r = 0;
      for (int32_t j : run) {
        if (j == shared_job_) continue;
        const int32_t slot = slot_of[r++];
        if (slot < 0 || static_cast<size_t>(slot) >= L.slot_views.size()) {
          throw std::logic_error("expert store returned slot " + std::to_string(slot) + " outside layer " + std::to_string(layer) + "'s " +
                                 std::to_string(L.slot_views.size()) + " slots");
        }
        jobs_[static_cast<size_t>(j)].e = &L.slot_views[static_cast<size_t>(slot)];
      }
    }
    run_jobs(run);
    for (int32_t j : run) job_done_[static_cast<size_t>(j)] = 1;
  } catch (...) {
    // Nothing of the layer ran yet: forget its plan, so that the caller may start it anew.
    if (first) moe_open_ = false;
    throw;
  }
  int64_t remaining = 0;
  for (int64_t j = 0; j < n_jobs_; j++) remaining += job_done_[static_cast<size_t>(j)] ? 0 : 1;
  if (remaining > 0) return remaining;
  combine_moe(layer);
  moe_open_ = false;
  phase_layer_++;
  phase_attended_ = false;
  return 0;
}

void Engine::plan_moe(int64_t layer, const int32_t* ids, const float* weights, int64_t k) {
  const EngineConfig& c = cfg_;
  const LayerWeights& L = layers_[static_cast<size_t>(layer)];
  const int64_t T = static_cast<int64_t>(pos_.size());
  moe_k_ = k;
  moe_ids_.assign(ids, ids + T * k);
  moe_w_.assign(weights, weights + T * k);

  // Tokens grouped by expert: every activated expert is read once for all its tokens.
  std::vector<FfnJob>& jobs = jobs_;
  job_of_expert_.assign(static_cast<size_t>(c.experts), -1);
  size_t n_jobs = 0;
  const auto job_for = [&](const ExpertMat* e, int32_t expert, int64_t width) -> FfnJob& {
    if (jobs.size() <= n_jobs) jobs.emplace_back();
    FfnJob& j = jobs[n_jobs++];
    j.e = e;
    j.expert = expert;
    j.width = width;
    j.tokens.clear();
    return j;
  };
  for (int64_t t = 0; t < T; t++) {
    for (int64_t i = 0; i < k; i++) {
      const int32_t e = ids[t * k + i];
      int32_t& jo = job_of_expert_[static_cast<size_t>(e)];
      if (jo < 0) {
        jo = static_cast<int32_t>(n_jobs);
        job_for(store_ ? nullptr : &L.experts[static_cast<size_t>(e)], e, c.expert_width);
      }
      FfnJob& j = jobs[static_cast<size_t>(jo)];
      if (j.tokens.empty() || j.tokens.back() != t) j.tokens.push_back(static_cast<int32_t>(t));
    }
  }
  shared_job_ = -1;
  if (c.shared_width > 0) {
    shared_job_ = static_cast<int64_t>(n_jobs);
    FfnJob& j = job_for(&L.shared, -1, c.shared_width);
    for (int64_t t = 0; t < T; t++) j.tokens.push_back(static_cast<int32_t>(t));
  }
  n_jobs_ = static_cast<int64_t>(n_jobs);
  job_done_.assign(n_jobs, 0);
  // Each token's input, quantized once for the layer; each job gathers its tokens' rows
  // (the same bytes as preparing them per job).
  prepare_acts(c.wtype, xn_.data(), T, c.hidden, c.hidden, moe_acts_);
  moe_open_ = true;
}

void Engine::run_jobs(const std::vector<int32_t>& run) {
  const EngineConfig& c = cfg_;
  const int64_t H = c.hidden;
  std::vector<FfnJob>& jobs = jobs_;
  const int64_t J = static_cast<int64_t>(run.size());
  if (J == 0) return;
  const auto job = [&](int64_t i) -> FfnJob& { return jobs[static_cast<size_t>(run[static_cast<size_t>(i)])]; };

  // Each job gathers its tokens' rows of moe_acts_ (prepared by plan_moe).
  pool_->parallel_for(J, 1, [&](int64_t ji, int) {
    FfnJob& j = job(ji);
    const int64_t n = static_cast<int64_t>(j.tokens.size());
    gather_acts(moe_acts_, j.tokens.data(), n, j.a_in);
    j.gu.reserve(static_cast<size_t>(n * 2 * j.width));
    j.act.reserve(static_cast<size_t>(n * j.width));
    j.out.reserve(static_cast<size_t>(n * H));
  });
  mark(kMoePrep);

  std::vector<int64_t> starts(static_cast<size_t>(J + 1), 0);
  // Work items: (job, row chunk) over all jobs, so that every thread stays busy even when
  // one expert is much larger than the others (the shared expert). Each output row is
  // computed by one work item whatever the grouping, so results do not depend on which
  // jobs run together.
  const auto run_chunks = [&](auto mat_of, auto body) {
    for (int64_t ji = 0; ji < J; ji++) {
      const WMat& w = mat_of(job(ji));
      starts[static_cast<size_t>(ji + 1)] = starts[static_cast<size_t>(ji)] + (w.rows + rows_per_item(w) - 1) / rows_per_item(w);
    }
    pool_->parallel_for(starts[static_cast<size_t>(J)], 1, [&](int64_t item, int) {
      const int64_t ji = std::upper_bound(starts.begin(), starts.end(), item) - starts.begin() - 1;
      FfnJob& j = job(ji);
      const WMat& w = mat_of(j);
      const int64_t per = rows_per_item(w);
      const int64_t r0 = (item - starts[static_cast<size_t>(ji)]) * per;
      body(j, r0, std::min(w.rows, r0 + per));
    });
  };

  run_chunks([](const FfnJob& j) -> const WMat& { return j.e->gate_up; },
             [&](FfnJob& j, int64_t r0, int64_t r1) { matmul(j.e->gate_up, j.a_in, r0, r1, j.gu.data(), 2 * j.width); });
  mark(kGateUp);
  pool_->parallel_for(J, 1, [&](int64_t ji, int) {
    FfnJob& j = job(ji);
    const int64_t n = static_cast<int64_t>(j.tokens.size()), W = j.width;
    const VecOps& ops = vecops();
    for (int64_t r = 0; r < n; r++) ops.silu_mul(j.act.data() + r * W, j.gu.data() + r * 2 * W, j.gu.data() + r * 2 * W + W, W);
    prepare_acts(c.wtype, j.act.data(), n, W, W, j.a_act);
  });
  mark(kAct);
  run_chunks([](const FfnJob& j) -> const WMat& { return j.e->down; }, [&](FfnJob& j, int64_t r0, int64_t r1) { matmul(j.e->down, j.a_act, r0, r1, j.out.data(), H); });
  mark(kDown);
}

void Engine::combine_moe(int64_t layer) {
  const EngineConfig& c = cfg_;
  const LayerWeights& L = layers_[static_cast<size_t>(layer)];
  const int64_t T = static_cast<int64_t>(pos_.size());
  const int64_t H = c.hidden;
  const int64_t k = moe_k_;
  const int32_t* ids = moe_ids_.data();
  const float* weights = moe_w_.data();
  const std::vector<FfnJob>& jobs = jobs_;
  const int64_t shared_job = shared_job_;
  // Combine per token in routing-rank order, then the shared expert with its sigmoid gate.
  moe_out_.assign(static_cast<size_t>(T * H), 0.f);
  const VecOps& ops = vecops();
  pool_->parallel_for(T, 4, [&](int64_t t, int) {
    float* y = moe_out_.data() + t * H;
    for (int64_t i = 0; i < k; i++) {
      const FfnJob& j = jobs[static_cast<size_t>(job_of_expert_[static_cast<size_t>(ids[t * k + i])])];
      const int64_t r = std::lower_bound(j.tokens.begin(), j.tokens.end(), static_cast<int32_t>(t)) - j.tokens.begin();
      ops.axpy(y, weights[t * k + i], j.out.data() + r * H, H);
    }
    if (shared_job >= 0) {
      const FfnJob& j = jobs[static_cast<size_t>(shared_job)];
      const float g = ops.dot(L.shared_gate.data(), xn_.data() + t * H, H);
      ops.axpy(y, 1.0f / (1.0f + std::exp(-g)), j.out.data() + t * H, H);
    }
  });
  for (size_t i = 0; i < x_.size(); i++) x_[i] += moe_out_[i];
  mark(kCombine);
}

void Engine::predict_router(int64_t from, int64_t to, std::vector<float>& out) {
  check_ready();
  const EngineConfig& c = cfg_;
  if (from < 0 || from >= c.layers || to <= from || to >= c.layers) {
    throw std::invalid_argument("predictRouter(" + std::to_string(from) + ", " + std::to_string(to) + "): need 0 <= from < to < " + std::to_string(c.layers));
  }
  if (!in_step_ || from != phase_layer_ || !phase_attended_) {
    throw std::logic_error("predictRouter(" + std::to_string(from) + ", ...) out of order: call it after attention(" + std::to_string(from) +
                           ") and before experts(" + std::to_string(from) + ") completes the layer");
  }
  const int64_t T = static_cast<int64_t>(pos_.size());
  const int64_t H = c.hidden, E = c.experts;
  const VecOps& ops = vecops();
  out.resize(static_cast<size_t>((to - from) * T * E));
  pred_xn_.resize(static_cast<size_t>(T * H));
  constexpr int64_t kExpertChunk = 16;
  const int64_t chunks = (E + kExpertChunk - 1) / kExpertChunk;
  for (int64_t j = from + 1; j <= to; j++) {
    const LayerWeights& L = layers_[static_cast<size_t>(j)];
    float* dst = out.data() + (j - from - 1) * T * E;
    pool_->parallel_for(T, 8, [&](int64_t t, int) { rms_norm_row(x_.data() + t * H, L.post_norm.data(), H, c.rms_eps, pred_xn_.data() + t * H); });
    if (!L.router_q8.empty()) {
      prepare_acts(WType::Q8_0, pred_xn_.data(), T, H, H, pred_acts_);
      matmul_parallel(*pool_, WMat{WType::Q8_0, E, H, L.router_q8.data()}, pred_acts_, dst, E);
      continue;
    }
    pool_->parallel_for(T * chunks, 1, [&](int64_t item, int) {
      const int64_t t = item / chunks;
      const int64_t e0 = (item % chunks) * kExpertChunk, e1 = std::min(E, e0 + kExpertChunk);
      const float* xn = pred_xn_.data() + t * H;
      for (int64_t e = e0; e < e1; e++) dst[t * E + e] = ops.dot(L.router.data() + e * H, xn, H);
    });
  }
}

const std::vector<float>& Engine::residual() const {
  if (x_.empty()) throw std::logic_error("residual(): no step has begun");
  return x_;
}

int64_t Engine::logit_rows(const std::vector<SeqSlice>& seqs) {
  int64_t r = 0;
  for (const SeqSlice& s : seqs) r += s.want_logits ? 1 : 0;
  return r;
}

void Engine::end_step(std::vector<float>& logits) {
  logits.resize(static_cast<size_t>(logit_rows() * cfg_.vocab));
  end_step(logits.data(), logits.size());
}

void Engine::end_step(float* logits, size_t n) {
  check_ready();
  if (!in_step_ || phase_layer_ != cfg_.layers) {
    throw std::logic_error("endStep() before every layer ran (" + std::to_string(phase_layer_) + " of " + std::to_string(cfg_.layers) + ")");
  }
  const int64_t H = cfg_.hidden, V = cfg_.vocab;
  std::vector<int64_t> rows;
  for (const SeqSlice& s : seqs_) {
    if (s.want_logits) rows.push_back(s.token_offset + s.n_tokens - 1);
  }
  if (n != rows.size() * static_cast<size_t>(V)) {
    throw std::invalid_argument("endStep(): the logits buffer holds " + std::to_string(n) + " floats; the step returns " + std::to_string(rows.size()) + " rows of " +
                                std::to_string(V));
  }
  in_step_ = false;
  if (rows.empty()) return;
  const int64_t R = static_cast<int64_t>(rows.size());
  std::vector<float> hn(static_cast<size_t>(R * H));
  for (int64_t r = 0; r < R; r++) rms_norm_row(x_.data() + rows[static_cast<size_t>(r)] * H, final_norm_.data(), H, cfg_.rms_eps, hn.data() + r * H);
  prepare_acts(dense_wtype(), hn.data(), R, H, H, acts_);
  // Every logit is written: the buffer needs no clearing.
  matmul_parallel(*pool_, cfg_.tie_embeddings ? embed_.m : lm_head_.m, acts_, logits, V);
  mark(kLmHead);
}

void Engine::step(const std::vector<int32_t>& tokens, const std::vector<SeqSlice>& seqs, std::vector<float>& logits) {
  logits.resize(static_cast<size_t>(logit_rows(seqs) * cfg_.vocab));
  step(tokens, seqs, logits.data(), logits.size());
}

void Engine::step(const std::vector<int32_t>& tokens, const std::vector<SeqSlice>& seqs, float* logits, size_t n) {
  if (store_) throw std::logic_error("offloading needs the step in pieces (beginStep, attention, experts, endStep); the fused step() does not load experts");
  if (n != static_cast<size_t>(logit_rows(seqs) * cfg_.vocab)) {
    throw std::invalid_argument("step(): the logits buffer holds " + std::to_string(n) + " floats; the step returns " + std::to_string(logit_rows(seqs)) + " rows of " +
                                std::to_string(cfg_.vocab));
  }
  begin_step(tokens, seqs);
  const int64_t T = static_cast<int64_t>(tokens.size());
  std::vector<int32_t> ids(static_cast<size_t>(T * cfg_.top_k));
  std::vector<float> w(static_cast<size_t>(T * cfg_.top_k));
  for (int64_t l = 0; l < cfg_.layers; l++) {
    attention(l);
    route(router_logits_.data(), T, ids.data(), w.data());
    experts(l, ids.data(), w.data(), T * cfg_.top_k, cfg_.top_k);
  }
  end_step(logits, n);
}

}  // namespace moe
