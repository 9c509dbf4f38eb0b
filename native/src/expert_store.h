// The tiered store of routed experts for offloading: the slow tier is one file holding
// every expert packed in the engine's format (one slot-sized record per (layer, expert)),
// the fast tier is a fixed arena of expert slots per layer, each layer with its own
// number of slots (the cache budget may be split unequally across layers). Loads run on
// dedicated I/O threads; which expert goes into which slot, and when, is decided by the
// caller.
//
// The file is created (it must not exist), opened a second time for reads (O_DIRECT when
// the file system accepts it) and unlinked at once, so nothing is left on disk after the
// process ends, however it ends.
//
// Thread safety: every public method may be called from one controlling thread (the
// engine's); the I/O threads only touch the slots they were given and the state under
// the mutex. A slot's bytes are written only by the read that fills it, and a resident
// expert's slot has no read in flight, so compute may use resident slots without locks.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "host_buffer.h"

namespace moe {

struct StoreConfig {
  std::string file;
  int64_t layers = 0;
  int64_t experts = 0;
  std::vector<int64_t> slots;  // slots of each layer (layers entries, each in 1..experts)
  size_t expert_bytes = 0;  // bytes of one packed expert
  int io_threads = 2;
  bool direct = true;
};

struct StoreStats {
  uint64_t loads = 0;      // reads completed (including discarded ones)
  uint64_t bytes_read = 0;
  uint64_t cancelled = 0;  // queued loads withdrawn before they started (cancel, evict, or the slot reassigned)
  uint64_t discarded = 0;  // reads that completed after their slot was emptied or reassigned
  uint64_t failed = 0;     // reads that failed (the error goes to the next wait for that expert)
  uint64_t paused = 0;     // times a background read paused between chunks for a demand read
  uint64_t abandoned = 0;  // background reads stopped between chunks: their slot was emptied or reassigned
  std::vector<double> stall_seconds;  // per layer
  // Wall time with at least one read in flight, and the sum of the reads' own durations:
  // bytes_read / busy_seconds is the bandwidth the slow tier delivered as it was used.
  double busy_seconds = 0;
  double read_seconds = 0;
  bool direct = false;
};

class ExpertStore {
 public:
  enum State : int { kAbsent = 0, kQueued = 1, kReading = 2, kResident = 3 };

  explicit ExpertStore(const StoreConfig& cfg);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  size_t slot_bytes() const { return slot_bytes_; }
  int64_t slots(int64_t layer) const;  // slots of a layer
  size_t arena_bytes() const;
  bool direct() const { return direct_.load(); }

  // ---- Writing the slow tier (while the model loads) ----
  // The staging buffer of (layer, expert): slot_bytes, zero padded; an expert already in
  // the file is read back into it first so that one part can be replaced.
  uint8_t* staging(int64_t layer, int64_t expert);
  // Part 0 (gate), 1 (up) or 2 (down) of the staged expert is in; once all three are, the
  // expert is written to the file and its staging buffer freed.
  void part_done(int64_t layer, int64_t expert, int part);
  bool written(int64_t layer, int64_t expert) const;
  // After the last expert: flushes the file and drops its pages from the page cache.
  void finish_writes();

  // ---- The fast tier ----
  const uint8_t* slot_data(int64_t layer, int64_t slot) const;
  // Queues a read of (layer, expert) into slot. Queued reads start in order of priority
  // (0 = demand, the default; a larger number waits behind every smaller one), FIFO within
  // a priority. With more than one I/O thread, reads of priority > 0 (background) occupy
  // at most all threads but one, so that a demand read always finds a thread free.
  // Background reads go in chunks and yield the device: between chunks a background read
  // pauses while a demand read is in flight or about to start (one read saturates the
  // slow tier, so sharing it would slow the demand read that compute waits for), unless
  // something waits for that read itself; and it stops when its slot was emptied or
  // reassigned meanwhile. Loading an expert already queued in that slot with a smaller
  // priority raises it to that priority.
  void load(int64_t layer, int64_t expert, int64_t slot, int priority = 0);
  bool cancel(int64_t layer, int64_t expert);
  void evict(int64_t layer, int64_t slot);
  int state(int64_t layer, int64_t expert);
  // Blocks until resident; returns the seconds waited. Throws when the expert is neither
  // resident nor loading, or its read failed (the error is reported once).
  double wait(int64_t layer, int64_t expert);
  // For compute: waits until each of the n distinct experts is resident and writes its
  // slot to slot_of[i]; the wait is added to the layer's stall time. Queued reads of
  // these experts are raised to demand priority (0) first. Throws (before
  // waiting) if one is neither resident nor loading, and if a read fails.
  void acquire(int64_t layer, const int32_t* experts, int64_t n, int32_t* slot_of);
  StoreStats stats();
  // For tests and diagnostics: from now on at most n more queued reads start (n < 0: no
  // limit, the default). Reads already started finish either way.
  void gate(int64_t n);
  // For tests and diagnostics: each piece of a read lasts at least this long (0: off).
  void throttle(double seconds_per_piece);

 private:
  struct Expert {
    int state = kAbsent;
    int32_t slot = -1;
    std::string error;  // failed read not yet reported
  };
  struct Slot {
    int32_t occupant = -1;  // expert queued, reading or resident here
    uint64_t gen = 0;       // bumped on every change of occupant
    bool busy = false;      // a read into this slot is in flight
    bool urgent = false;      // a waiter needs the read in flight here (if background, it no longer yields)
    bool background = false;  // the read in flight here is a background one
  };
  struct Job {
    int64_t layer, expert, slot;
    uint64_t gen;
    int priority;
    uint64_t seq;  // arrival order (FIFO within a priority)
  };
  struct Staged {
    HostBuffer buf;
    unsigned parts = 0;
  };

  void check_layer(int64_t layer) const;
  void check_expert(int64_t layer, int64_t expert) const;
  void check_slot(int64_t layer, int64_t slot) const;
  Expert& ex(int64_t layer, int64_t expert) { return experts_[static_cast<size_t>(layer * cfg_.experts + expert)]; }
  Slot& sl(int64_t layer, int64_t slot) { return slots_[slot_base_[static_cast<size_t>(layer)] + static_cast<size_t>(slot)]; }
  std::string name(int64_t layer, int64_t expert) const;
  // Empties a slot (mu_ held): a queued load is withdrawn, a read in flight will be discarded.
  void drop_occupant(int64_t layer, int64_t slot);
  bool remove_queued(int64_t layer, int64_t expert);
  // Raises the queued load of (layer, expert) to `priority` when that is more urgent (mu_ held).
  void promote_queued(int64_t layer, int64_t expert, int priority);
  bool pick(Job& job);
  void io_main();
  // Reads the record of job into its slot: "" on success, kAbandoned when a background
  // read found its slot emptied or reassigned between chunks, else the error. A
  // background read pauses between chunks while a demand read is in flight or waiting
  // for a thread (mu_ not held on entry).
  std::string read_record(const Job& job, uint8_t* dst, bool background, size_t* bytes);
  // A paused background read of job waits (mu_ held).
  bool yield_to_demand(const Job& job);
  // Something waits for the read in flight into (layer, slot): it must not pause (mu_ held).
  void mark_urgent(int64_t layer, int64_t slot);
  void write_record(int64_t index, const uint8_t* src);
  void drop_written_pages();

  StoreConfig cfg_;
  size_t slot_bytes_ = 0;
  size_t chunk_bytes_ = 0;  // piece of a background read between its pauses
  int wfd_ = -1;  // read-write, buffered: writes while loading, read-back of staged experts
  int rfd_ = -1;  // reads of loads: O_DIRECT when accepted, else the same file buffered
  std::atomic<bool> direct_{false};
  std::vector<HostBuffer> arenas_;  // per layer, its slots * slot_bytes
  std::vector<size_t> slot_base_;   // per layer: index of its slot 0 in slots_ (layers + 1 entries)
  std::vector<uint8_t> written_;    // per (layer, expert)
  std::unordered_map<int64_t, Staged> staged_;
  size_t unflushed_ = 0;

  std::mutex mu_;
  std::condition_variable work_cv_;  // I/O threads: a job may be startable, or stop
  std::condition_variable done_cv_;  // waiters: a read finished
  std::vector<Expert> experts_;
  std::vector<Slot> slots_;
  std::deque<Job> queue_;
  uint64_t next_seq_ = 0;
  std::atomic<double> throttle_{0.0};
  int64_t gate_ = -1;  // reads that may still start (< 0: any number)
  int reads_in_flight_ = 0;
  std::chrono::steady_clock::time_point busy_since_{};
  int background_reads_ = 0;  // reads of priority > 0 in flight
  int urgent_background_ = 0;  // of those, reads something waits for (they count as demand reads)
  int paused_ = 0;              // background reads paused now (waiting on work_cv_ inside their read)
  StoreStats stats_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace moe
