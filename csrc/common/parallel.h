// A small parallel-for for the CPU kernels.
//
// Threads are started per call and joined before returning: there is no pool that could be
// left broken in a forked DataLoader worker, and the kernels that use this run for far longer
// than a thread start (~20 us). The caller passes torch.get_num_threads().
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace dbf_ext {

// Calls fn(begin, end) over [0, n) in chunks of `grain`, on up to `num_threads` threads.
// Chunks are handed out dynamically, so uneven work (some rows dense, some empty) balances.
// Runs inline when one thread suffices. The first exception thrown by fn is rethrown.
template <typename F>
void parallel_for(std::int64_t n, std::int64_t grain, int num_threads, const F& fn) {
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  const std::int64_t chunks = (n + grain - 1) / grain;
  const int threads = static_cast<int>(std::min<std::int64_t>(std::max(num_threads, 1), chunks));
  if (threads <= 1) {
    fn(std::int64_t{0}, n);
    return;
  }
  std::atomic<std::int64_t> next_chunk{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    try {
      for (std::int64_t c = next_chunk.fetch_add(1); c < chunks; c = next_chunk.fetch_add(1)) {
        const std::int64_t begin = c * grain;
        fn(begin, std::min(n, begin + grain));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next_chunk.store(chunks);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace dbf_ext
