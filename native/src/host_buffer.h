// Large host allocations for weights and the KV cache: mapped directly (never from the
// C heap, so that closing an engine gives the memory back to the system at once) and
// advised to use transparent huge pages, which cuts TLB misses when decode streams
// hundreds of megabytes of weights per token.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe {

class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t bytes);  // zero-filled; throws std::bad_alloc with a message on failure
  ~HostBuffer();
  HostBuffer(HostBuffer&& o) noexcept;
  HostBuffer& operator=(HostBuffer&& o) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() { return p_; }
  const uint8_t* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  // Backs bytes [from, to) with memory now (writes a zero into each page), so that later
  // first writes do not fault page by page in the middle of a step.
  void prefault(size_t from, size_t to);

 private:
  void release();
  uint8_t* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace moe
