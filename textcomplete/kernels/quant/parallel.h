// Work split across torch's threads in pieces handed out as threads free up.
//
// A static split (at::parallel_for's: one contiguous range per thread) makes every product wait for its
// slowest thread, and on a machine whose cores are shared with other processes that is whichever thread was
// descheduled: the others spin at the barrier. Pieces taken from an atomic counter let the threads that
// run take over a delayed thread's share.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace tcq {

// fn(begin, end) over [0, n) in pieces of `piece` items (the last may be shorter), on at most one thread per
// `per_thread` items (so small work stays on the calling thread).
template <class Fn>
void parallel_pieces(int64_t n, int64_t piece, int64_t per_thread, const Fn& fn) {
  if (n <= 0) return;
  piece = std::max<int64_t>(1, piece);
  const int64_t pieces = (n + piece - 1) / piece;
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), pieces,
                                             (n + std::max<int64_t>(1, per_thread) - 1) / std::max<int64_t>(1, per_thread)});
  if (threads <= 1 || at::in_parallel_region()) return fn(int64_t{0}, n);
  std::atomic<int64_t> next{0};
  // One index per thread; each then takes pieces until none is left.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < pieces;)
      fn(p * piece, std::min(n, (p + 1) * piece));
  });
}

// Pieces for n items on the current threads: about `per_thread_pieces` a thread, a multiple of `align`.
inline int64_t piece_size(int64_t n, int64_t align, int64_t per_thread_pieces = 8) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (n + threads * per_thread_pieces - 1) / (threads * per_thread_pieces);
  return std::max<int64_t>(align, (want + align - 1) / align * align);
}

}  // namespace tcq
