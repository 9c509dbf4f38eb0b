// Deciding whether the avx512 family uses the AMX Q8_0 kernel (kernels_amx.cc): CPU and
// OS support, the tile-data permission, a self-test against the VNNI kernel (a fault in it
// is caught) and a timing against it. Compiled for the baseline ISA like every file
// without an ISA suffix: the files built with wider ISA flags hold only their kernels,
// with nothing a linker could merge across objects (no out-of-line template code: a
// std::mt19937 instantiated in an AVX-512 object once served the whole addon and stopped
// an AVX2 host with an illegal instruction). Its calls into the AVX-512 and AMX code run
// only on CPUs that have them.
#include <setjmp.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"

namespace moe {
namespace kdetail {

namespace {

std::once_flag g_amx_once;
// -1: not decided yet; 0: the AVX-512 Q8_0 kernel does not use matmul_q8_amx (also while
// the self-test runs, which compares the two); 1: it does.
std::atomic<int> g_amx{-1};
bool g_amx_usable = false;
const char* g_amx_status = "not checked";
char g_amx_status_buf[200];

thread_local sigjmp_buf* t_guard = nullptr;
struct sigaction g_old_ill, g_old_segv, g_old_bus;

void guard_handler(int sig, siginfo_t* si, void* ctx) {
  if (t_guard != nullptr) siglongjmp(*t_guard, sig);
  // Not ours: hand it to the previous handler (or the default action).
  const struct sigaction* old = sig == SIGILL ? &g_old_ill : sig == SIGSEGV ? &g_old_segv : &g_old_bus;
  if (old->sa_flags & SA_SIGINFO) {
    old->sa_sigaction(sig, si, ctx);
  } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
    old->sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
    raise(sig);
  }
}

// A random Q8_0 product for the start-up checks: weights (rows, cols), n tokens.
struct Problem {
  std::vector<uint8_t> w;
  Acts acts;
  WMat m;
  Problem(int64_t rows, int64_t cols, int64_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> wf(static_cast<size_t>(rows * cols)), xf(static_cast<size_t>(n * cols));
    for (float& v : wf) v = u(rng) * 0.05f;
    for (float& v : xf) v = u(rng);
    w.resize(static_cast<size_t>(rows) * row_bytes(WType::Q8_0, cols));
    quantize_rows(WType::Q8_0, wf.data(), rows, cols, w.data());
    prepare_avx512(WType::Q8_0, xf.data(), n, cols, cols, acts);
    m = WMat{WType::Q8_0, rows, cols, w.data()};
  }
};

// Runs matmul_q8_amx against the VNNI kernel on random Q8_0 weights (rows that are not a
// multiple of 16 included) with 64 tokens; a fault in the tile instructions is caught.
bool self_test() {
  const int64_t rows = 40, n = 64;
  const Problem p(rows, 256, n, 7);
  const WMat& m = p.m;
  const Acts& acts = p.acts;
  std::vector<float> want(static_cast<size_t>(n * rows)), got(static_cast<size_t>(n * rows), -1.0f);
  matmul_avx512(m, acts, 0, rows, want.data(), rows);  // g_amx is 0 during the test
  struct sigaction sa {};
  sa.sa_sigaction = guard_handler;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGILL, &sa, &g_old_ill);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  sigjmp_buf jb;
  volatile bool ran = false;
  if (sigsetjmp(jb, 1) == 0) {
    t_guard = &jb;
    matmul_q8_amx(m, acts, 0, rows, got.data(), rows);
    ran = true;
  }
  t_guard = nullptr;
  sigaction(SIGILL, &g_old_ill, nullptr);
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  if (!ran) {
    g_amx_status = "the tile instructions faulted in the self-test";
    return false;
  }
  // Tokens [0, 64) are all in 16-token groups: every output must be the VNNI kernel's.
  if (std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) != 0) {
    g_amx_status = "the self-test's results differ from the AVX-512 kernel's";
    return false;
  }
  return true;
}

// Best of a few timed runs of each kernel on a prefill-sized product (128 x 2048, 64
// tokens, one thread): AMX is used only where it is the faster, as measured on this CPU.
bool faster_than_vnni(double* amx_gmacs, double* vnni_gmacs) {
  const int64_t rows = 128, cols = 2048, n = 64;
  const Problem p(rows, cols, n, 11);
  const WMat& m = p.m;
  const Acts& acts = p.acts;
  std::vector<float> y(static_cast<size_t>(n * rows));
  const auto best_of = [&](bool amx) {
    double best = 1e30;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      if (amx) matmul_q8_amx(m, acts, 0, rows, y.data(), rows);
      else matmul_avx512(m, acts, 0, rows, y.data(), rows);  // g_amx is 0 meanwhile
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return static_cast<double>(rows * cols * n) / best / 1e9;
  };
  *vnni_gmacs = best_of(false);
  *amx_gmacs = best_of(true);
  return *amx_gmacs > *vnni_gmacs;
}

void init_amx() {
  if (!amx_q8_built()) {
    g_amx_status = "not built (the compiler has no AMX support)";
    return;
  }
  const CpuFeatures& f = cpu_features();
  // VNNI too: the self-test compares with the VNNI kernel, which every AMX CPU has.
  if (!(f.amx_tile && f.amx_int8 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni)) {
    g_amx_status = "not supported by this CPU";
    return;
  }
  const char* env = std::getenv("MOE_SERVE_AMX");
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    g_amx_status = "off (MOE_SERVE_AMX=0)";
    return;
  }
  // Linux: the tile data state must be requested per process (arch_prctl
  // ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18) before the first tile instruction.
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    g_amx_status = "the OS refused the tile data permission";
    return;
  }
  if (!self_test()) {
    std::fprintf(stderr, "moe-serve: AMX not used: %s\n", g_amx_status);
    return;
  }
  double amx = 0, vnni = 0;
  g_amx_usable = faster_than_vnni(&amx, &vnni);
  std::snprintf(g_amx_status_buf, sizeof g_amx_status_buf, "%s (start-up check, one thread, 128 x 2048 Q8_0 with 64 tokens: AMX %.1f GMAC/s, VNNI %.1f)",
                g_amx_usable ? "in use" : "not used: slower than the VNNI kernel on this CPU", amx, vnni);
  g_amx_status = g_amx_status_buf;
}

void decide() {
  std::call_once(g_amx_once, [] {
    g_amx.store(0);
    init_amx();
    g_amx.store(g_amx_usable ? 1 : 0);
  });
}

}  // namespace

bool amx_q8_active() {
  const int s = g_amx.load(std::memory_order_acquire);
  if (s >= 0) return s == 1;
  decide();
  return g_amx.load(std::memory_order_acquire) == 1;
}

const char* amx_q8_status() {
  decide();
  return g_amx_status;
}

}  // namespace kdetail
}  // namespace moe
