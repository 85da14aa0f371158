// Work split across threads in pieces handed out as threads free up.
//
// A static split (one contiguous range per thread) makes every product wait for its slowest thread, and on a
// machine whose cores are shared with other processes that is whichever thread was descheduled: the others
// spin at the barrier. Pieces taken from an atomic counter let the threads that run take over a delayed
// thread's share. The pieces shrink as the work runs out (guided scheduling): each taker gets a share of what
// is left, so that the first pieces are large and the threads end within one small piece of each other. With
// a fixed 1/16 of a product a piece, the other thread waited at the end of each of a decode step's ~120
// products for half a piece on average: libgomp's spinning was 6% of the samples of a 1.7B Q4_K_M decode step
// on two threads.
//
// Inside a torch extension (TCQ_ATEN) the threads are ATen's parallel region, their number torch's
// (at::get_num_threads, which the engine sets per process). In the library without torch (native.cpp) they
// are a pool of its own (WorkerPool below), whose calling thread never waits for a helper that has not
// started: an OpenMP region ends at a barrier that every thread of its team must reach, so a helper the
// system has not scheduled holds the caller for up to a time slice, in each of a step's hundreds of products.
#pragma once

#ifdef TCQ_ATEN
#include <ATen/Parallel.h>
#include <omp.h>
#else
#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <condition_variable>
#include <thread>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

namespace tcq {

#ifdef TCQ_ATEN
inline int num_threads() { return at::get_num_threads(); }

inline bool in_parallel_work() { return omp_in_parallel() || at::in_parallel_region(); }

// fn() on each of `threads` threads of one parallel region.
template <class Fn>
void share_work(int64_t threads, const Fn& fn) {
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { fn(); });
}
#else
// The threads of this process's CPU set: the default until set_num_threads says otherwise.
inline int available_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// Threads of the parallel products; 0 (the start) means one per CPU this process may run on.
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> threads{0};
  return threads;
}

inline void set_num_threads(int threads) { thread_setting().store(std::max(0, threads)); }

inline int num_threads() {
  const int threads = thread_setting().load();
  return threads > 0 ? threads : available_cpus();
}

// Whether this thread is running a piece of shared work (work it shares again runs on it alone).
inline bool& in_parallel_work() {
  static thread_local bool inside = false;
  return inside;
}

// Helper threads that join the work a calling thread shares, if they are running when it does.
//
// One job at a time: the calling thread publishes it under a new generation, runs it itself, then closes it
// and waits only for the helpers that joined it (and are finishing a piece). A helper joins by one
// compare-and-swap on the state word (generation, closed, helpers in), so it cannot join a closed or later
// job. Idle helpers spin briefly on the word, then sleep until a new generation wakes them. A second thread
// that shares work while a job runs (another engine in the same process) runs its work alone. The pool is
// never destroyed: its sleeping helpers end with the process. A child of fork() has none of its parent's
// helpers (and perhaps a lock held by a thread it does not have), so it starts a pool of its own.
class WorkerPool {
 public:
  static WorkerPool& instance() { return *current(); }

  // Runs fn() on the calling thread and on up to `threads - 1` helpers that join in time.
  template <class Fn>
  void run(int64_t threads, const Fn& fn) {
    std::unique_lock<std::mutex> caller(caller_, std::try_to_lock);
    if (!caller.owns_lock() || threads <= 1) return fn();
    grow(static_cast<int>(threads) - 1);
    Job job{&call<Fn>, &fn};
    job_ = &job;
    limit_.store(threads - 1, std::memory_order_relaxed);
    const uint64_t generation = (state_.load(std::memory_order_relaxed) >> kGenerationShift) + 1;
    state_.store(generation << kGenerationShift, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      const std::lock_guard<std::mutex> lock(sleep_guard_);
      wake_.notify_all();
    }
    job.execute();
    // Close the job; helpers already in finish their pieces (the work has none left to hand out by now).
    uint64_t state = state_.fetch_or(kClosed, std::memory_order_acq_rel) | kClosed;
    for (int spins = 0; (state & kHelpersMask) != 0; ++spins) {
      if (spins < kSpinsBeforeYield) {
        pause();
      } else {
        std::this_thread::yield();
      }
      state = state_.load(std::memory_order_acquire);
    }
    job_ = nullptr;
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    void (*thunk)(const void*);
    const void* fn;
    std::mutex error_guard{};
    std::exception_ptr error{};

    void execute() {
      in_parallel_work() = true;
      try {
        thunk(fn);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(error_guard);
        if (!error) error = std::current_exception();
      }
      in_parallel_work() = false;
    }
  };

  // State word: generation in the high bits, the closed flag, then how many helpers are in the job.
  static constexpr int kGenerationShift = 32;
  static constexpr uint64_t kClosed = uint64_t{1} << 31;
  static constexpr uint64_t kHelpersMask = kClosed - 1;
  static constexpr int kSpinsBeforeYield = 1 << 12;
  // How long an idle helper watches for the next job before it sleeps: a step's products follow each other
  // within microseconds; the steps themselves are a little further apart.
  static constexpr std::chrono::microseconds kIdleSpin{300};

  template <class Fn>
  static void call(const void* fn) { (*static_cast<const Fn*>(fn))(); }

  // This process's pool; only a fork's child replaces it (leaking its parent's), while it is single-threaded.
  static WorkerPool*& current() {
    static WorkerPool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { current() = new WorkerPool(); });
      return new WorkerPool();
    }();
    return pool;
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  WorkerPool() { state_.store(kClosed); }   // generation 0, closed: nothing to join

  void grow(int helpers) {
    for (; helpers_ < helpers; ++helpers_) std::thread([this] { serve(); }).detach();
  }

  void serve() {
    uint64_t seen = 0;   // the last generation this helper looked at
    for (;;) {
      uint64_t state = wait_for_job(seen);
      seen = state >> kGenerationShift;
      // Join, unless the job is closed, full or already replaced; then take pieces until there are none.
      while ((state >> kGenerationShift) == seen && !(state & kClosed) &&
             static_cast<int64_t>(state & kHelpersMask) < limit_.load(std::memory_order_relaxed)) {
        if (state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) {
          job_->execute();
          state_.fetch_sub(1, std::memory_order_release);
          break;
        }
      }
    }
  }

  // The state once its generation is past `seen`: watched for a while, then slept on.
  uint64_t wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kIdleSpin;
    for (int spins = 1;; ++spins) {
      const uint64_t state = state_.load(std::memory_order_acquire);
      if ((state >> kGenerationShift) != seen) return state;
      pause();
      if (spins % 1024 == 0 && std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lock(sleep_guard_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t state;
    wake_.wait(lock, [&] {
      state = state_.load(std::memory_order_seq_cst);
      return (state >> kGenerationShift) != seen;
    });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return state;
  }

  // What idle helpers watch, alone on its cache line; the job's details on the next, written before it.
  alignas(64) std::atomic<uint64_t> state_{0};
  alignas(64) std::atomic<int64_t> limit_{0};   // helpers the current job takes
  Job* job_ = nullptr;                          // the current job: read by a helper only once it has joined
  alignas(64) std::mutex caller_;               // held by the thread whose job runs
  int helpers_ = 0;                     // threads started (detached), grown under caller_
  std::mutex sleep_guard_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

// fn() on the calling thread and on up to `threads - 1` helpers: those that join in time.
template <class Fn>
void share_work(int64_t threads, const Fn& fn) {
  WorkerPool::instance().run(threads, fn);
}
#endif

// fn(begin, end) over [0, n) in pieces of a multiple of `piece` items (the last may be shorter), on at most one
// thread per `per_thread` items (so small work stays on the calling thread).
template <class Fn>
void parallel_pieces(int64_t n, int64_t piece, int64_t per_thread, const Fn& fn) {
  if (n <= 0) return;
  piece = std::max<int64_t>(1, piece);
  const int64_t pieces = (n + piece - 1) / piece;
  per_thread = std::max<int64_t>(1, per_thread);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(num_threads()), pieces, (n + per_thread - 1) / per_thread});
  if (threads <= 1 || in_parallel_work()) return fn(int64_t{0}, n);
  std::atomic<int64_t> next{0};
  // Each thread takes a share of what is left, 1 / (2 threads) of it in whole pieces, until nothing is.
  share_work(threads, [&] {
    for (int64_t begin = next.load(std::memory_order_relaxed); begin < n;) {
      const int64_t size = std::max(piece, (n - begin) / (2 * threads) / piece * piece);
      if (next.compare_exchange_weak(begin, begin + size, std::memory_order_relaxed)) {
        fn(begin, std::min(n, begin + size));
        begin = next.load(std::memory_order_relaxed);
      }
    }
  });
}

}  // namespace tcq
