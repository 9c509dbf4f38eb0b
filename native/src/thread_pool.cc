// ThreadPool: persistent workers woken per loop by a generation counter. Decode runs
// many small loops back to back (tens of microseconds each), so a worker spins for a
// short while on the counter before sleeping on a condition variable; the caller does
// the same while waiting for the last workers to finish.
#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_CPU_RELAX() _mm_pause()
#else
#define MOE_CPU_RELAX() std::this_thread::yield()
#endif

namespace moe {

namespace {
// How long a waiting thread spins before sleeping. Waking a sleeping thread costs
// tens of microseconds on bare metal and more than 100 us on some VMs (measured on the
// 2-vCPU KVM development host: 110 us per loop when both sides slept), which is longer
// than a whole decode matmul. So a thread spins through the many small loops of a step
// and only sleeps once the engine has been idle for this long.
constexpr std::chrono::microseconds kSpinTime{2000};

// Spins until done() or kSpinTime has passed; returns done().
template <typename Done>
bool spin_until(const Done& done) {
  if (done()) return true;
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      MOE_CPU_RELAX();
      if (done()) return true;
    }
    const auto spent = std::chrono::steady_clock::now() - start;
    if (spent >= kSpinTime) return done();
    // Past the first stretch the peer may have been preempted (a shared, oversubscribed
    // machine): let it have this core if it is queued here.
    if (spent >= kSpinTime / 16) std::this_thread::yield();
  }
}
}  // namespace

struct ThreadPool::Impl {
  int threads = 1;
  std::vector<std::thread> workers;

  // The current loop. Written by the caller before `generation` is bumped (release),
  // read by workers after they observe the new generation (acquire).
  const std::function<void(int64_t, int)>* fn = nullptr;
  int64_t n = 0;
  int64_t grain = 1;
  alignas(64) std::atomic<int64_t> next{0};
  alignas(64) std::atomic<uint64_t> generation{0};
  alignas(64) std::atomic<int> busy{0};  // workers still inside the current loop
  std::atomic<bool> stop{false};

  std::mutex mu;
  std::condition_variable wake;  // workers sleep here between loops
  std::condition_variable done;  // the caller sleeps here waiting for `busy == 0`
  std::exception_ptr error;      // first exception of the loop, guarded by mu

  void run_items(int thread) {
    const int64_t total = n;
    const int64_t g = grain;
    for (;;) {
      const int64_t begin = next.fetch_add(g, std::memory_order_relaxed);
      if (begin >= total) return;
      const int64_t end = std::min(total, begin + g);
      try {
        for (int64_t i = begin; i < end; ++i) (*fn)(i, thread);
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(mu);
          if (!error) error = std::current_exception();
        }
        next.store(total, std::memory_order_relaxed);  // hand out nothing more
        return;
      }
    }
  }

  void worker_main(int thread) {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation.load(std::memory_order_acquire) != seen; });
      uint64_t g = generation.load(std::memory_order_acquire);
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mu);
        wake.wait(lock, [&] { return generation.load(std::memory_order_acquire) != seen || stop.load(); });
        g = generation.load(std::memory_order_acquire);
      }
      if (stop.load(std::memory_order_acquire)) return;
      seen = g;
      run_items(thread);
      if (busy.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu);  // pairs with the caller's predicate check
        done.notify_one();
      }
    }
  }
};

ThreadPool::ThreadPool(int threads) : impl_(new Impl) {
  if (threads < 1) {
    delete impl_;
    throw std::invalid_argument("ThreadPool: threads must be >= 1, got " + std::to_string(threads));
  }
  impl_->threads = threads;
  impl_->workers.reserve(static_cast<size_t>(threads - 1));
  for (int i = 1; i < threads; ++i) impl_->workers.emplace_back([this, i] { impl_->worker_main(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop.store(true, std::memory_order_release);
    impl_->generation.fetch_add(1, std::memory_order_acq_rel);
  }
  impl_->wake.notify_all();
  for (std::thread& t : impl_->workers) t.join();
  delete impl_;
}

int ThreadPool::size() const { return impl_->threads; }

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t i, int thread)>& fn) {
  if (n <= 0) return;
  Impl& p = *impl_;
  grain = std::max<int64_t>(grain, 1);
  if (p.threads == 1 || n <= grain) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);  // exceptions propagate directly
    return;
  }
  p.fn = &fn;
  p.n = n;
  p.grain = grain;
  p.error = nullptr;
  p.next.store(0, std::memory_order_relaxed);
  p.busy.store(p.threads - 1, std::memory_order_relaxed);
  {
    // Bumping under the mutex closes the race with a worker that has just checked the
    // predicate and is about to sleep.
    std::lock_guard<std::mutex> lock(p.mu);
    p.generation.fetch_add(1, std::memory_order_acq_rel);
  }
  p.wake.notify_all();

  p.run_items(0);

  if (!spin_until([&] { return p.busy.load(std::memory_order_acquire) == 0; })) {
    std::unique_lock<std::mutex> lock(p.mu);
    p.done.wait(lock, [&] { return p.busy.load(std::memory_order_acquire) == 0; });
  }
  p.fn = nullptr;
  std::exception_ptr err;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    err = p.error;
    p.error = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace moe
