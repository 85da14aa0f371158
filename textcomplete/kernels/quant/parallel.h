// Work split across torch's threads in pieces handed out as threads free up.
//
// A static split (at::parallel_for's: one contiguous range per thread) makes every product wait for its
// slowest thread, and on a machine whose cores are shared with other processes that is whichever thread was
// descheduled: the others spin at the barrier. Pieces taken from an atomic counter let the threads that
// run take over a delayed thread's share. The pieces shrink as the work runs out (guided scheduling): each
// taker gets a share of what is left, so that the first pieces are large and the threads end within one
// small piece of each other. With a fixed 1/16 of a product a piece, the other thread waited at the end
// of each of a decode step's ~120 products for half a piece on average: libgomp's spinning was 6% of the
// samples of a 1.7B Q4_K_M decode step on two threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace tcq {

// fn(begin, end) over [0, n) in pieces of a multiple of `piece` items (the last may be shorter), on at most one
// thread per `per_thread` items (so small work stays on the calling thread).
template <class Fn>
void parallel_pieces(int64_t n, int64_t piece, int64_t per_thread, const Fn& fn) {
  if (n <= 0) return;
  piece = std::max<int64_t>(1, piece);
  const int64_t pieces = (n + piece - 1) / piece;
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), pieces,
                                             (n + std::max<int64_t>(1, per_thread) - 1) / std::max<int64_t>(1, per_thread)});
  if (threads <= 1 || at::in_parallel_region()) return fn(int64_t{0}, n);
  std::atomic<int64_t> next{0};
  // One index per thread; each then takes a share of what is left, 1 / (2 threads) of it in whole pieces,
  // until nothing is.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
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
