#include "host_buffer.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe {

namespace {
constexpr size_t kHugePage = 2u << 20;
}

HostBuffer::HostBuffer(size_t bytes) {
  if (bytes == 0) return;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    throw std::runtime_error("cannot allocate " + std::to_string(bytes) + " bytes: " + std::strerror(errno));
  }
#ifdef MADV_HUGEPAGE
  // Advice only: without transparent huge pages the mapping works the same.
  if (bytes >= kHugePage) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  p_ = static_cast<uint8_t*>(p);
  n_ = bytes;
}

void HostBuffer::prefault(size_t from, size_t to) {
  to = to < n_ ? to : n_;
  constexpr size_t kPage = 4096;
  volatile uint8_t* p = p_;
  for (size_t i = from; i < to; i += kPage) p[i] = 0;
}

HostBuffer::~HostBuffer() { release(); }

HostBuffer::HostBuffer(HostBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    release();
    p_ = std::exchange(o.p_, nullptr);
    n_ = std::exchange(o.n_, 0);
  }
  return *this;
}

void HostBuffer::release() {
  if (p_ != nullptr) munmap(p_, n_);
  p_ = nullptr;
  n_ = 0;
}

}  // namespace moe
