#include "expert_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>

namespace moe {

namespace {

constexpr size_t kAlign = 4096;                 // direct-I/O alignment of offsets, sizes and buffers
constexpr size_t kFlushBytes = size_t{256} << 20;  // written bytes between page-cache drops while loading
// Background reads go in pieces of at most this size (a multiple of kAlign): small enough
// that a demand read waits at most about one piece, large enough that direct reads of it
// keep the device's bandwidth (measured here: 1 MiB pieces read as fast as whole 5 MB
// records, 256 KiB pieces 25-40% slower). Smaller records go in quarters.
constexpr size_t kBackgroundChunk = size_t{1} << 20;
const char* const kAbandoned = "abandoned";
// The I/O threads' waits (idle, and a background read paused for a demand read) re-check
// their condition at least this often, whatever they were told: should a wake-up go
// missing, it costs this long, not a hang of everything waiting for that read.
constexpr auto kRecheck = std::chrono::milliseconds(50);

std::string errno_text(int e) { return std::string(std::strerror(e)); }

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

ExpertStore::ExpertStore(const StoreConfig& cfg) : cfg_(cfg) {
  if (cfg.file.empty()) throw std::invalid_argument("offload.file must name the expert file");
  if (cfg.layers <= 0 || cfg.experts <= 0 || cfg.expert_bytes == 0) throw std::invalid_argument("expert store: empty model shape");
  if (cfg.slots.size() != static_cast<size_t>(cfg.layers)) {
    throw std::invalid_argument("offload.slotsPerLayer must give the slots of each of the " + std::to_string(cfg.layers) + " layers, got " +
                                std::to_string(cfg.slots.size()));
  }
  for (size_t l = 0; l < cfg.slots.size(); l++) {
    if (cfg.slots[l] < 1 || cfg.slots[l] > cfg.experts) {
      throw std::invalid_argument("offload.slotsPerLayer must be in 1.." + std::to_string(cfg.experts) + ", got " + std::to_string(cfg.slots[l]) +
                                  " for layer " + std::to_string(l));
    }
  }
  if (cfg.io_threads < 1 || cfg.io_threads > 64) {
    throw std::invalid_argument("offload.ioThreads must be in 1..64, got " + std::to_string(cfg.io_threads));
  }
  slot_bytes_ = (cfg.expert_bytes + kAlign - 1) / kAlign * kAlign;
  chunk_bytes_ = std::max(kAlign, std::min(kBackgroundChunk, slot_bytes_ / 4 / kAlign * kAlign));
  const uint64_t records = static_cast<uint64_t>(cfg.layers) * static_cast<uint64_t>(cfg.experts);
  if (records > (uint64_t{1} << 62) / slot_bytes_) throw std::invalid_argument("expert store: the expert file would be too large");

  wfd_ = ::open(cfg.file.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (wfd_ < 0) {
    const int e = errno;
    if (e == EEXIST) {
      throw std::runtime_error("expert file " + cfg.file + " already exists: give a path that does not exist (the engine creates it and unlinks it at once)");
    }
    throw std::runtime_error("cannot create the expert file " + cfg.file + ": " + errno_text(e));
  }
  // Both descriptors are opened before the name goes away.
  int rfd = -1;
  bool direct = false;
  if (cfg.direct) {
    rfd = ::open(cfg.file.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (rfd >= 0) {
      direct = true;
    } else if (errno != EINVAL) {
      const int e = errno;
      ::unlink(cfg.file.c_str());
      ::close(wfd_);
      throw std::runtime_error("cannot open the expert file " + cfg.file + " for direct reads: " + errno_text(e));
    }
  }
  if (rfd < 0) rfd = ::open(cfg.file.c_str(), O_RDONLY | O_CLOEXEC);
  if (rfd < 0) {
    const int e = errno;
    ::unlink(cfg.file.c_str());
    ::close(wfd_);
    throw std::runtime_error("cannot open the expert file " + cfg.file + " for reads: " + errno_text(e));
  }
  rfd_ = rfd;
  direct_ = direct;
  if (::unlink(cfg.file.c_str()) != 0) {
    const int e = errno;
    ::close(rfd_);
    ::close(wfd_);
    throw std::runtime_error("cannot unlink the expert file " + cfg.file + ": " + errno_text(e));
  }

  // Everything below may throw (allocation): release the descriptors then.
  try {
    arenas_.reserve(static_cast<size_t>(cfg.layers));
    slot_base_.assign(static_cast<size_t>(cfg.layers) + 1, 0);
    for (int64_t l = 0; l < cfg.layers; l++) {
      const size_t n = static_cast<size_t>(cfg.slots[static_cast<size_t>(l)]);
      arenas_.emplace_back(slot_bytes_ * n);
      slot_base_[static_cast<size_t>(l) + 1] = slot_base_[static_cast<size_t>(l)] + n;
    }
    written_.assign(static_cast<size_t>(records), 0);
    experts_.resize(static_cast<size_t>(records));
    slots_.resize(slot_base_.back());
    stats_.stall_seconds.assign(static_cast<size_t>(cfg.layers), 0.0);
    for (int i = 0; i < cfg.io_threads; i++) threads_.emplace_back([this] { io_main(); });
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
    ::close(rfd_);
    ::close(wfd_);
    throw;
  }
}

ExpertStore::~ExpertStore() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    queue_.clear();
  }
  work_cv_.notify_all();
  // Reads in flight finish into their slots before the arenas go away.
  for (auto& t : threads_) t.join();
  if (rfd_ >= 0) ::close(rfd_);
  if (wfd_ >= 0) ::close(wfd_);
}

size_t ExpertStore::arena_bytes() const {
  size_t b = 0;
  for (const auto& a : arenas_) b += a.size();
  return b;
}

std::string ExpertStore::name(int64_t layer, int64_t expert) const {
  return "expert " + std::to_string(expert) + " of layer " + std::to_string(layer);
}

void ExpertStore::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= cfg_.layers) {
    throw std::invalid_argument("layer " + std::to_string(layer) + " out of range (0.." + std::to_string(cfg_.layers - 1) + ")");
  }
}

void ExpertStore::check_expert(int64_t layer, int64_t expert) const {
  check_layer(layer);
  if (expert < 0 || expert >= cfg_.experts) {
    throw std::invalid_argument("expert " + std::to_string(expert) + " out of range (0.." + std::to_string(cfg_.experts - 1) + ")");
  }
}

void ExpertStore::check_slot(int64_t layer, int64_t slot) const {
  check_layer(layer);
  const int64_t n = cfg_.slots[static_cast<size_t>(layer)];
  if (slot < 0 || slot >= n) {
    throw std::invalid_argument("slot " + std::to_string(slot) + " out of range (0.." + std::to_string(n - 1) + " in layer " + std::to_string(layer) + ")");
  }
}

int64_t ExpertStore::slots(int64_t layer) const {
  check_layer(layer);
  return cfg_.slots[static_cast<size_t>(layer)];
}

// ---------------------------------------------------------------------------------
// The slow tier

void ExpertStore::write_record(int64_t index, const uint8_t* src) {
  const off_t off = static_cast<off_t>(static_cast<uint64_t>(index) * slot_bytes_);
  size_t done = 0;
  while (done < slot_bytes_) {
    const ssize_t w = ::pwrite(wfd_, src + done, slot_bytes_ - done, off + static_cast<off_t>(done));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("writing " + name(index / cfg_.experts, index % cfg_.experts) + " to the expert file failed: " + errno_text(errno));
    }
    if (w == 0) {
      throw std::runtime_error("short write of " + name(index / cfg_.experts, index % cfg_.experts) + " to the expert file: " + std::to_string(done) +
                               " of " + std::to_string(slot_bytes_) + " bytes");
    }
    done += static_cast<size_t>(w);
  }
  unflushed_ += slot_bytes_;
  if (unflushed_ >= kFlushBytes) drop_written_pages();
}

void ExpertStore::drop_written_pages() {
  // Written pages stay in the page cache until written back; flush them and let them go,
  // so that loading a large model does not leave the whole file cached.
  if (::fdatasync(wfd_) != 0) throw std::runtime_error("flushing the expert file failed: " + errno_text(errno));
  ::posix_fadvise(wfd_, 0, 0, POSIX_FADV_DONTNEED);
  unflushed_ = 0;
}

uint8_t* ExpertStore::staging(int64_t layer, int64_t expert) {
  check_expert(layer, expert);
  const int64_t idx = layer * cfg_.experts + expert;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ex(layer, expert).state != kAbsent) throw std::logic_error("cannot replace the weights of " + name(layer, expert) + " while it is in the fast tier");
  }
  auto it = staged_.find(idx);
  if (it != staged_.end()) return it->second.buf.data();
  Staged s;
  s.buf = HostBuffer(slot_bytes_);
  if (written_[static_cast<size_t>(idx)]) {
    // Replacing a part of an expert already in the file: start from what is there.
    std::string err;
    const off_t off = static_cast<off_t>(static_cast<uint64_t>(idx) * slot_bytes_);
    size_t done = 0;
    while (done < slot_bytes_) {
      const ssize_t r = ::pread(wfd_, s.buf.data() + done, slot_bytes_ - done, off + static_cast<off_t>(done));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) throw std::runtime_error("reading back " + name(layer, expert) + " from the expert file failed");
      done += static_cast<size_t>(r);
    }
    s.parts = 7;
  }
  uint8_t* p = s.buf.data();
  staged_.emplace(idx, std::move(s));
  return p;
}

void ExpertStore::part_done(int64_t layer, int64_t expert, int part) {
  check_expert(layer, expert);
  const int64_t idx = layer * cfg_.experts + expert;
  auto it = staged_.find(idx);
  if (it == staged_.end() || part < 0 || part > 2) throw std::logic_error("part_done without a staged expert");
  it->second.parts |= 1u << part;
  if (it->second.parts != 7) return;
  write_record(idx, it->second.buf.data());
  written_[static_cast<size_t>(idx)] = 1;
  staged_.erase(it);
}

bool ExpertStore::written(int64_t layer, int64_t expert) const {
  check_expert(layer, expert);
  return written_[static_cast<size_t>(layer * cfg_.experts + expert)] != 0;
}

void ExpertStore::finish_writes() {
  if (unflushed_ > 0) drop_written_pages();
}

// ---------------------------------------------------------------------------------
// The fast tier

const uint8_t* ExpertStore::slot_data(int64_t layer, int64_t slot) const {
  check_slot(layer, slot);
  return arenas_[static_cast<size_t>(layer)].data() + static_cast<size_t>(slot) * slot_bytes_;
}

bool ExpertStore::remove_queued(int64_t layer, int64_t expert) {
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    if (it->layer == layer && it->expert == expert) {
      queue_.erase(it);
      return true;
    }
  }
  return false;
}

void ExpertStore::promote_queued(int64_t layer, int64_t expert, int priority) {
  for (auto& j : queue_) {
    if (j.layer == layer && j.expert == expert) {
      if (priority < j.priority) {
        j.priority = priority;
        // An idle thread may now start it (a background read no longer blocks it), and a
        // paused background read must see a demand read that can start.
        work_cv_.notify_all();
      }
      return;
    }
  }
}

void ExpertStore::drop_occupant(int64_t layer, int64_t slot) {
  Slot& s = sl(layer, slot);
  if (s.occupant >= 0) {
    Expert& e = ex(layer, s.occupant);
    if (e.state == kQueued && remove_queued(layer, s.occupant)) stats_.cancelled++;
    // kReading: the read goes on into this slot and is discarded (its gen no longer
    // matches); the slot stays busy until it ends, so no later read overlaps it.
    e.state = kAbsent;
    e.slot = -1;
    s.occupant = -1;
  }
  s.gen++;
}

void ExpertStore::load(int64_t layer, int64_t expert, int64_t slot, int priority) {
  check_expert(layer, expert);
  check_slot(layer, slot);
  if (priority < 0) throw std::invalid_argument("load priority must be >= 0, got " + std::to_string(priority));
  if (!written_[static_cast<size_t>(layer * cfg_.experts + expert)]) throw std::logic_error(name(layer, expert) + " was never written to the expert file");
  {
    std::lock_guard<std::mutex> lock(mu_);
    Expert& e = ex(layer, expert);
    if (e.state != kAbsent) {
      if (e.slot == slot) {  // already queued, reading or resident there
        if (e.state == kQueued) promote_queued(layer, expert, priority);
        return;
      }
      throw std::logic_error(name(layer, expert) + " is already in slot " + std::to_string(e.slot) + "; evict it before loading it into slot " +
                             std::to_string(slot));
    }
    drop_occupant(layer, slot);
    Slot& s = sl(layer, slot);
    s.occupant = static_cast<int32_t>(expert);
    e.state = kQueued;
    e.slot = static_cast<int32_t>(slot);
    e.error.clear();
    queue_.push_back(Job{layer, expert, slot, s.gen, priority, next_seq_++});
  }
  // An idle thread may start this, and a paused background read must re-check whether to
  // go on: all are woken. Waking one when no read was paused lost wake-ups: between this
  // unlock and the notification, a background read could pause for this very load (its
  // condition, a demand read that can start, had just become true), and notify_one could
  // then wake that read, which goes back to waiting, instead of the idle thread that would
  // start the load. The engine waited for the load, the read for the engine's load, and
  // the idle thread for work: a decode of the test suite hung so, once in many runs.
  work_cv_.notify_all();
}

bool ExpertStore::cancel(int64_t layer, int64_t expert) {
  check_expert(layer, expert);
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Expert& e = ex(layer, expert);
    if (e.state != kQueued) return false;
    drop_occupant(layer, e.slot);
    wake = paused_ > 0;
  }
  if (wake) work_cv_.notify_all();  // a background read paused for this (demand) load goes on
  return true;
}

void ExpertStore::evict(int64_t layer, int64_t slot) {
  check_slot(layer, slot);
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    drop_occupant(layer, slot);
    wake = paused_ > 0;
  }
  if (wake) work_cv_.notify_all();  // a paused background read into the slot stops
}

int ExpertStore::state(int64_t layer, int64_t expert) {
  check_expert(layer, expert);
  std::lock_guard<std::mutex> lock(mu_);
  return ex(layer, expert).state;
}

double ExpertStore::wait(int64_t layer, int64_t expert) {
  check_expert(layer, expert);
  std::unique_lock<std::mutex> lock(mu_);
  Expert& e = ex(layer, expert);
  const auto t0 = std::chrono::steady_clock::now();
  bool waited = false;
  for (;;) {
    if (e.state == kResident) return waited ? seconds_since(t0) : 0.0;
    if (e.state == kAbsent) {
      if (!e.error.empty()) {
        const std::string msg = std::move(e.error);
        e.error.clear();
        throw std::runtime_error(msg);
      }
      throw std::logic_error(name(layer, expert) + " is neither resident nor loading");
    }
    if (e.state == kReading) mark_urgent(layer, e.slot);
    waited = true;
    done_cv_.wait(lock);
  }
}

void ExpertStore::mark_urgent(int64_t layer, int64_t slot) {
  Slot& s = sl(layer, slot);
  if (s.urgent || !s.busy) return;
  s.urgent = true;
  if (s.background) urgent_background_++;
  if (paused_ > 0) work_cv_.notify_all();  // its read, if paused, goes on
}

void ExpertStore::acquire(int64_t layer, const int32_t* ids, int64_t n, int32_t* slot_of) {
  check_layer(layer);
  std::unique_lock<std::mutex> lock(mu_);
  const auto report = [&](int64_t i) {
    Expert& e = ex(layer, ids[i]);
    if (!e.error.empty()) {
      const std::string msg = std::move(e.error);
      e.error.clear();
      throw std::runtime_error(msg);
    }
    throw std::logic_error(name(layer, ids[i]) + " is not resident (load it before experts())");
  };
  for (int64_t i = 0; i < n; i++) {
    check_expert(layer, ids[i]);
    if (ex(layer, ids[i]).state == kAbsent) report(i);
  }
  for (int64_t i = 0; i < n; i++) {
    if (ex(layer, ids[i]).state == kQueued) promote_queued(layer, ids[i], 0);
  }
  const auto t0 = std::chrono::steady_clock::now();
  bool waited = false;
  for (;;) {
    bool all = true;
    for (int64_t i = 0; i < n; i++) {
      const int st = ex(layer, ids[i]).state;
      if (st == kAbsent) {
        if (waited) stats_.stall_seconds[static_cast<size_t>(layer)] += seconds_since(t0);
        report(i);  // its read failed while we waited
      }
      if (st == kReading) mark_urgent(layer, ex(layer, ids[i]).slot);
      if (st != kResident) all = false;
    }
    if (all) break;
    waited = true;
    done_cv_.wait(lock);
  }
  if (waited) stats_.stall_seconds[static_cast<size_t>(layer)] += seconds_since(t0);
  for (int64_t i = 0; i < n; i++) slot_of[i] = ex(layer, ids[i]).slot;
}

void ExpertStore::gate(int64_t n) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    gate_ = n < 0 ? -1 : n;
  }
  work_cv_.notify_all();
}

void ExpertStore::throttle(double seconds_per_piece) { throttle_ = seconds_per_piece > 0 ? seconds_per_piece : 0.0; }

StoreStats ExpertStore::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  StoreStats s = stats_;
  s.direct = direct_.load();
  return s;
}

// ---------------------------------------------------------------------------------
// I/O threads

bool ExpertStore::pick(Job& job) {
  if (gate_ == 0) return false;
  // The most urgent priority first, FIFO within it (the queue is in arrival order),
  // except that a load into a slot whose previous (discarded) read is still in flight
  // waits for that read to end.
  const bool background_full = background_reads_ >= std::max(1, cfg_.io_threads - 1);
  auto best = queue_.end();
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    if (sl(it->layer, it->slot).busy) continue;
    if (it->priority > 0 && background_full) continue;
    if (best == queue_.end() || it->priority < best->priority) best = it;
    if (best->priority == 0) break;
  }
  if (best == queue_.end()) return false;
  job = *best;
  queue_.erase(best);
  if (gate_ > 0) gate_--;
  return true;
}

bool ExpertStore::yield_to_demand(const Job& job) {
  Slot& s = sl(job.layer, job.slot);
  if (stop_ || s.urgent || s.gen != job.gen) return false;
  if (reads_in_flight_ - background_reads_ + urgent_background_ > 0) return true;  // a demand read is in flight
  // A demand read that can start now: a thread is free (this one is busy) and its slot is.
  if (gate_ == 0 || reads_in_flight_ >= cfg_.io_threads) return false;
  for (const Job& q : queue_) {
    if (q.priority == 0 && !sl(q.layer, q.slot).busy) return true;
  }
  return false;
}

std::string ExpertStore::read_record(const Job& job, uint8_t* dst, bool background, size_t* bytes) {
  const int64_t index = job.layer * cfg_.experts + job.expert;
  const off_t off = static_cast<off_t>(static_cast<uint64_t>(index) * slot_bytes_);
  size_t done = 0;
  *bytes = 0;
  while (done < slot_bytes_) {
    size_t want = slot_bytes_ - done;
    if (background) {
      std::unique_lock<std::mutex> lock(mu_);
      if (yield_to_demand(job)) {
        stats_.paused++;
        paused_++;
        while (!work_cv_.wait_for(lock, kRecheck, [&] { return !yield_to_demand(job); })) {
        }
        paused_--;
      }
      if (stop_ || sl(job.layer, job.slot).gen != job.gen) return kAbandoned;
      if (!sl(job.layer, job.slot).urgent) want = std::min(want, chunk_bytes_);
    }
    const double throttle = throttle_.load();
    if (throttle > 0) std::this_thread::sleep_for(std::chrono::duration<double>(throttle));
    const bool direct = direct_.load();
    const ssize_t r = ::pread(direct ? rfd_ : wfd_, dst + done, want, off + static_cast<off_t>(done));
    if (r < 0) {
      const int e = errno;
      if (e == EINTR) continue;
      if (e == EINVAL && direct) {
        // The file system accepted O_DIRECT at open but refuses the read: buffered from now on.
        direct_ = false;
        continue;
      }
      return "reading " + name(job.layer, job.expert) + " from the expert file failed: " + errno_text(e);
    }
    if (r == 0) {
      return "short read of " + name(job.layer, job.expert) + " from the expert file: " + std::to_string(done) + " of " +
             std::to_string(slot_bytes_) + " bytes";
    }
    done += static_cast<size_t>(r);
    *bytes = done;
  }
  // Buffered reads leave the pages cached: drop them, the fast tier is the slots.
  if (!direct_.load()) ::posix_fadvise(wfd_, off, static_cast<off_t>(slot_bytes_), POSIX_FADV_DONTNEED);
  return std::string();
}

void ExpertStore::io_main() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    Job job{};
    while (!work_cv_.wait_for(lock, kRecheck, [&] { return stop_ || pick(job); })) {
    }
    if (stop_) return;
    Slot& s = sl(job.layer, job.slot);
    if (s.gen != job.gen || s.occupant != job.expert) continue;  // cannot happen: withdrawn loads leave the queue
    Expert& e = ex(job.layer, job.expert);
    e.state = kReading;
    const bool background = job.priority > 0;
    s.busy = true;
    s.urgent = false;
    s.background = background;
    if (background) background_reads_++;
    uint8_t* dst = arenas_[static_cast<size_t>(job.layer)].data() + static_cast<size_t>(job.slot) * slot_bytes_;
    const auto t0 = std::chrono::steady_clock::now();
    if (reads_in_flight_++ == 0) busy_since_ = t0;
    lock.unlock();
    size_t bytes = 0;
    const std::string err = read_record(job, dst, background, &bytes);
    lock.lock();
    const auto t1 = std::chrono::steady_clock::now();
    stats_.read_seconds += std::chrono::duration<double>(t1 - t0).count();
    if (--reads_in_flight_ == 0) stats_.busy_seconds += std::chrono::duration<double>(t1 - busy_since_).count();
    if (background && s.urgent) urgent_background_--;
    s.busy = false;
    s.urgent = false;
    s.background = false;
    if (background) background_reads_--;
    stats_.bytes_read += bytes;
    const bool abandoned = err == kAbandoned;
    if (abandoned) {
      stats_.abandoned++;
    } else if (err.empty()) {
      stats_.loads++;
    } else {
      stats_.failed++;
    }
    if (s.gen == job.gen && s.occupant == job.expert) {
      if (err.empty()) {
        e.state = kResident;
      } else {
        e.state = kAbsent;
        e.slot = -1;
        e.error = err;
        s.occupant = -1;
        s.gen++;
      }
    } else if (!abandoned) {
      stats_.discarded++;
    }
    done_cv_.notify_all();
    work_cv_.notify_all();  // a load waiting for this slot may start now, a paused read may go on
  }
}

}  // namespace moe
