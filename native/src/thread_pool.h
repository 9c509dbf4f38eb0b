// A fixed pool of worker threads for the engine's data-parallel loops. The calling
// thread takes part in every loop, so a pool of n threads runs n-1 workers.
#pragma once

#include <cstdint>
#include <functional>

namespace moe {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);  // threads >= 1, including the caller
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const;
  // Runs fn(i, thread_index) for i in [0, n), items spread over all threads (work stealing
  // by an atomic counter, in chunks of `grain`); returns when all are done. Not reentrant.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t i, int thread)>& fn);

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace moe
