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
// The threads are OpenMP's. Inside a torch extension (TCQ_ATEN) their number is torch's (at::get_num_threads,
// which the engine sets per process) and the team is ATen's parallel region; in the library without torch
// (native.cpp) it is what set_num_threads last set, by default OpenMP's own.
#pragma once

#include <omp.h>

#ifdef TCQ_ATEN
#include <ATen/Parallel.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

namespace tcq {

#ifndef TCQ_ATEN
// Threads of a parallel region; 0 (the start) means OpenMP's default.
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> threads{0};
  return threads;
}

inline void set_num_threads(int threads) { thread_setting().store(std::max(0, threads)); }
#endif

inline int num_threads() {
#ifdef TCQ_ATEN
  return at::get_num_threads();
#else
  const int threads = thread_setting().load();
  return threads > 0 ? threads : omp_get_max_threads();
#endif
}

// fn() on each of `threads` threads of one parallel region; the first exception any of them throws is
// rethrown here once all have ended.
template <class Fn>
void on_threads(int64_t threads, const Fn& fn) {
#ifdef TCQ_ATEN
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { fn(); });
#else
  std::exception_ptr error;
  std::mutex guard;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    try {
      fn();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(guard);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
#endif
}

// fn(begin, end) over [0, n) in pieces of a multiple of `piece` items (the last may be shorter), on at most one
// thread per `per_thread` items (so small work stays on the calling thread).
template <class Fn>
void parallel_pieces(int64_t n, int64_t piece, int64_t per_thread, const Fn& fn) {
  if (n <= 0) return;
  piece = std::max<int64_t>(1, piece);
  const int64_t pieces = (n + piece - 1) / piece;
  per_thread = std::max<int64_t>(1, per_thread);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(num_threads()), pieces, (n + per_thread - 1) / per_thread});
  if (threads <= 1 || omp_in_parallel()) return fn(int64_t{0}, n);
  std::atomic<int64_t> next{0};
  // Each thread takes a share of what is left, 1 / (2 threads) of it in whole pieces, until nothing is.
  on_threads(threads, [&] {
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
