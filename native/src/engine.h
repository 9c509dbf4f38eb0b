// The CPU engine: weights packed in the engine's formats, a paged KV cache, and the
// forward pass of the supported MoE architectures for batches that mix prefill and
// decode. Policy (which experts, which tokens) is decided by the caller; this file is
// mechanism only.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "expert_store.h"
#include "host_buffer.h"
#include "kernels.h"
#include "thread_pool.h"

namespace moe {

enum class QkNorm : uint8_t { None = 0, PerHead = 1, Full = 2 };

struct EngineConfig {
  int64_t vocab = 0;
  int64_t hidden = 0;
  int64_t layers = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t experts = 0;
  int64_t top_k = 0;
  int64_t expert_width = 0;
  int64_t shared_width = 0;  // 0: no shared expert
  bool renorm_topk = false;  // softmax → top-k → renormalise; else keep the softmax values
  QkNorm qk_norm = QkNorm::None;
  bool qkv_bias = false;
  bool tie_embeddings = false;
  float rms_eps = 1e-6f;
  float rope_theta = 10000.f;
  int64_t max_positions = 4096;
  // Storage format of the large matrices (attention, experts, embedding, LM head).
  // Norms, biases and routers stay float32.
  WType wtype = WType::F32;
  int threads = 1;
  int64_t kv_block_size = 16;
  int64_t kv_blocks = 0;
  // KV cache elements: IEEE float16 (half the memory; attention reads them as float32),
  // else float32.
  bool kv_f16 = false;
  // Expert offloading (expert_store.h), on when offload_slots is not empty: routed experts
  // live in `offload_file` and layer l has offload_slots[l] slots (one entry per layer,
  // each in 1..experts; the budget may be split unequally); only the step in pieces runs.
  std::string offload_file;
  std::vector<int64_t> offload_slots;
  int offload_io_threads = 2;
  bool offload_direct = true;
};

// A matrix in the engine's format with its own storage.
struct OwnedMat {
  WMat m{WType::F32, 0, 0, nullptr};
  HostBuffer bytes;
  void alloc(WType t, int64_t rows, int64_t cols);
  size_t size_bytes() const { return bytes.size(); }
};

// One routed expert: gate rows, then up rows, then down rows, in one piece of memory, so
// that it moves and is read as one piece. gate_up views the first 2*width rows as one
// matrix. A layer's routed experts lie back to back in the layer's arena (`bytes` stays
// empty, `present` tells the expert was given); a shared expert has its own buffer.
struct ExpertMat {
  HostBuffer bytes;
  bool present = false;
  WMat gate_up{WType::F32, 0, 0, nullptr};  // (2 * width, hidden)
  WMat down{WType::F32, 0, 0, nullptr};     // (hidden, width)
};

struct LayerWeights {
  std::vector<float> input_norm;  // (hidden)
  std::vector<float> post_norm;   // (hidden)
  OwnedMat qkv;                   // (q_dim + 2 * kv_dim, hidden): q, k, v rows stacked
  std::vector<float> qkv_bias;    // (q_dim + 2 * kv_dim) or empty
  OwnedMat o;                     // (hidden, q_dim)
  std::vector<float> q_norm;      // (head_dim) per head, or (q_dim); empty when none
  std::vector<float> k_norm;      // (head_dim) per head, or (kv_dim)
  std::vector<float> router;      // (experts, hidden), float32
  std::vector<uint8_t> router_q8; // pre-gating's copy of router in Q8_0 (empty when hidden % 32 != 0)
  std::vector<ExpertMat> experts; // [experts], views of expert_arena; none resident when offloading
  HostBuffer expert_arena;        // the routed experts, expert after expert (one mapping: huge pages)
  std::vector<ExpertMat> slot_views; // offloading: views of the layer's slots (no storage of their own)
  ExpertMat shared;               // shared expert (width shared_width) when present
  std::vector<float> shared_gate; // (hidden) when present
};

// One sequence's part of a step. Positions start_pos .. start_pos+n_tokens-1 are new.
// A float buffer that grows without initialising and never shrinks. (std::vector::resize
// zero-fills whatever it grows back into: the MoE jobs' buffers, resized for each layer's
// token counts, cost a 2048-token prefill hundreds of megabytes of memset per step.)
class FloatScratch {
 public:
  float* reserve(size_t n) {
    if (n > cap_) {
      p_.reset(new float[n]);
      cap_ = n;
    }
    return p_.get();
  }
  float* data() { return p_.get(); }
  const float* data() const { return p_.get(); }

 private:
  std::unique_ptr<float[]> p_;
  size_t cap_ = 0;
};

struct SeqSlice {
  int64_t start_pos = 0;
  int64_t n_tokens = 0;
  int64_t token_offset = 0;  // index of its first token in the step's token array
  bool want_logits = false;
  std::vector<int32_t> blocks;  // KV block table
};

class Engine {
 public:
  explicit Engine(const EngineConfig& cfg);
  ~Engine();

  const EngineConfig& config() const { return cfg_; }
  // Format of the dense matrices (embeddings, attention, lm_head): q4_0 applies to the
  // experts (routed and shared) only and the rest stays q8_0, a few percent of an MoE
  // model's bytes that carry most of 4-bit's error on the next-token choice.
  WType dense_wtype() const { return cfg_.wtype == WType::Q4_0 ? WType::Q8_0 : cfg_.wtype; }

  // Loading: each tensor once, stored as `st` (F32, F16 or BF16), by role.
  // Roles: embed, lm_head, final_norm; per layer: input_norm, post_norm, q, k, v, o,
  // q_bias, k_bias, v_bias, q_norm, k_norm, router, shared_gate_scalar; per expert
  // (expert >= 0): gate, up, down; shared expert (expert = -1): gate, up, down.
  void set_tensor(const std::string& role, int64_t layer, int64_t expert, const uint8_t* src, WType st, int64_t rows, int64_t cols);
  // Checks every tensor was given; after this the engine runs.
  void finalize();

  // The fused step: embeddings → layers (attention, router, top-k, experts) → logits
  // of the sequences that want them, (rows, vocab) into `logits`: `n` floats, exactly
  // logit_rows(seqs) * vocab (every one is written).
  void step(const std::vector<int32_t>& tokens, const std::vector<SeqSlice>& seqs, float* logits, size_t n);
  void step(const std::vector<int32_t>& tokens, const std::vector<SeqSlice>& seqs, std::vector<float>& logits);
  // Rows of logits a step over `seqs` returns (its sequences that want logits).
  static int64_t logit_rows(const std::vector<SeqSlice>& seqs);
  // The same for the step begun (between begin_step and end_step).
  int64_t logit_rows() const { return logit_rows(seqs_); }

  // The same step in pieces, for callers that decide routing themselves:
  // begin_step(); for each layer: attention(l) → router logits (T, experts);
  // experts(l, ids, weights) with (T, k) assignments; then end_step().
  void begin_step(const std::vector<int32_t>& tokens, const std::vector<SeqSlice>& seqs);
  const std::vector<float>& attention(int64_t layer);
  // ids and weights hold n = T * k entries. `subset` (n_subset distinct expert ids among
  // ids) runs only those experts now, keeping their outputs; the layer completes (combine,
  // next layer) on the call that has run every expert of ids, and each call of the layer
  // must pass the same ids and weights. nullptr: every expert not yet run. Returns the
  // number of the layer's experts still to run (0: the layer is done). Offloading: each
  // expert run must be resident or loading (waited for, counted as stall).
  int64_t experts(int64_t layer, const int32_t* ids, const float* weights, int64_t n, int64_t k, const int32_t* subset = nullptr,
                  int64_t n_subset = 0);
  // Pre-gating, after attention(from) and before its experts complete: the routers of
  // layers from+1..to on the current residual normalised by each one's MoE input norm,
  // (to - from, T, experts) into `out`. A prediction: it reads Q8_0 copies of the routers
  // (a quarter of the float32 bytes, read again at every layer that predicts), with
  // 8-bit activations; the step's own routing keeps the float32 router.
  void predict_router(int64_t from, int64_t to, std::vector<float>& out);
  // The residual stream (T, hidden) of the current or last step.
  const std::vector<float>& residual() const;
  // Logits of the step's sequences that want them: `n` floats, exactly logit_rows() * vocab.
  void end_step(float* logits, size_t n);
  void end_step(std::vector<float>& logits);

  // The gating rule on router logits (T, experts) → ids and weights (T, top_k).
  void route(const float* router_logits, int64_t n_tokens, int32_t* ids, float* weights) const;

  // Time spent per phase of the step since the last reset, in milliseconds (collected
  // only when MOE_SERVE_PROFILE=1, since the clock reads cost a little on every phase).
  static constexpr int kPhases = 12;
  static const char* phase_name(int phase);
  std::array<double, kPhases> take_profile();

  size_t weight_bytes() const;
  size_t kv_bytes() const;
  size_t expert_bytes() const;  // bytes of one routed expert

  bool offload() const { return store_ != nullptr; }
  ExpertStore& store();  // throws unless offloading

 private:
  void check_ready() const;
  void embed(const std::vector<int32_t>& tokens);
  void attention_block(int64_t layer);
  void plan_moe(int64_t layer, const int32_t* ids, const float* weights, int64_t k);
  void run_jobs(const std::vector<int32_t>& run);
  void combine_moe(int64_t layer);

  // One expert's work in a step: which token rows it reads, and its buffers (kept across
  // steps so that decode does not allocate).
  struct FfnJob {
    const ExpertMat* e = nullptr;
    int32_t expert = -1;  // routed expert id; -1 for the shared expert
    int64_t width = 0;
    std::vector<int32_t> tokens;  // token indices, ascending
    FloatScratch gu;   // (n, 2 * width)
    FloatScratch act;  // (n, width)
    FloatScratch out;  // (n, hidden)
    Acts a_in;
    Acts a_act;
  };

  void mark(int phase);
  bool profiling_ = false;
  std::chrono::steady_clock::time_point prof_t_;
  std::array<double, kPhases> prof_{};

  EngineConfig cfg_;
  std::unique_ptr<ThreadPool> pool_;
  OwnedMat embed_;
  OwnedMat lm_head_;  // empty when tied to the embedding
  std::vector<float> final_norm_;
  std::vector<LayerWeights> layers_;
  bool ready_ = false;

  // Paged KV cache: per layer, (blocks, block_size, kv_heads * head_dim) for K and V.
  std::vector<HostBuffer> k_cache_;
  std::vector<HostBuffer> v_cache_;

  // Per-step state.
  std::vector<SeqSlice> seqs_;
  bool in_step_ = false;
  int64_t phase_layer_ = 0;       // next layer of the step in pieces
  bool phase_attended_ = false;   // attention of phase_layer_ ran, experts not yet
  std::vector<int64_t> pos_;        // (T) position of each new token
  std::vector<int64_t> seq_of_;     // (T) index into seqs_
  std::vector<float> x_;            // (T, hidden) residual stream
  std::vector<float> xn_;           // (T, hidden) normalised input of the current block
  std::vector<float> qkv_;          // (T, q_dim + 2 kv_dim)
  std::vector<float> attn_;         // (T, q_dim)
  std::vector<float> proj_;         // (T, hidden)
  std::vector<float> router_logits_;  // (T, experts)
  std::vector<float> moe_out_;      // (T, hidden)
  Acts acts_;
  std::vector<FfnJob> jobs_;
  // The MoE block's input of every token, prepared for the expert format once per layer.
  Acts moe_acts_;
  Acts router_acts_;
  // Rotary frequencies theta^(-2i / head_dim), i < head_dim / 2.
  std::vector<double> rope_inv_freq_;
  // Per step token: cos, then sin, of its position times each frequency (filled at layer 0).
  std::vector<double> rope_cs_;

  // The MoE block of the current layer while its experts run (in one or several calls).
  bool moe_open_ = false;
  int64_t moe_k_ = 0;
  std::vector<int32_t> moe_ids_;        // (T, k)
  std::vector<float> moe_w_;            // (T, k)
  std::vector<int32_t> job_of_expert_;  // [experts] → job, -1 when not routed to
  std::vector<char> job_done_;          // [jobs]
  int64_t n_jobs_ = 0;
  int64_t shared_job_ = -1;
  std::vector<float> pred_xn_;          // predict_router's normalised rows
  Acts pred_acts_;                      // and their 8-bit form

  std::unique_ptr<ExpertStore> store_;  // offloading only
};

}  // namespace moe
