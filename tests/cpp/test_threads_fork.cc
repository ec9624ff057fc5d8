// Thread-count bounds, and fork: a child made by fork() after the parent ran OpenMP threads runs
// its kernels on one thread (libgomp cannot restart its pool there; a multi-threaded region in
// the child would wait forever). The child runs under a watchdog: a hang fails the test.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "divkit/divkit.h"

namespace divkit_test {
namespace {

using divkit::DType;
using divkit::TensorView;

// Restores the thread count when a test ends.
struct ThreadsGuard {
  int saved = divkit::get_num_threads();
  ~ThreadsGuard() { divkit::set_num_threads(saved); }
};

TEST(Threads, SetNumThreadsIsBounded) {
  ThreadsGuard guard;
  const int hi = divkit::max_num_threads();
  EXPECT_GE(hi, 8);
  EXPECT_NO_THROW(divkit::set_num_threads(hi));
  EXPECT_EQ(divkit::get_num_threads(), hi);
  EXPECT_NO_THROW(divkit::set_num_threads(1));
  for (int bad : {0, -1, hi + 1, 2147483647, -2147483647 - 1}) {
    try {
      divkit::set_num_threads(bad);
      ADD_FAILURE() << bad << " accepted";
    } catch (const divkit::Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("set_num_threads: n must be in [1, ", 0), 0u)
          << e.what();
    }
  }
  EXPECT_EQ(divkit::get_num_threads(), 1);
}

// A problem big enough for the divergence kernel to start a team of threads.
struct Problem {
  static constexpr int64_t n = 64, v = 4096;
  std::vector<float> s, t;
  Problem() : s(n * v), t(n * v) {
    for (int64_t i = 0; i < n * v; ++i) {
      s[i] = static_cast<float>((i * 7919) % 1000) / 250.0f;
      t[i] = static_cast<float>((i * 104729) % 1000) / 300.0f;
    }
  }
  float loss() {
    return divkit::divergence_f32(s.data(), t.data(), n, v, divkit::DivergenceSpec{},
                                  divkit::Reduction::mean, nullptr);
  }
};

// Runs `child` in a fork child with a watchdog; returns its exit status (or -signal; -100 when it
// did not finish in time and was killed).
template <typename F>
int in_fork_child(F child, int timeout_s = 60) {
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(static_cast<unsigned>(timeout_s + 5));  // the child cannot outlive a lost parent
    int code = 1;
    try {
      code = child();
    } catch (...) {
      code = 2;
    }
    _exit(code);
  }
  if (pid < 0) return -200;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -100;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return -WTERMSIG(status);
}

TEST(Fork, ChildAfterThreadsRunsOnOneThreadWithTheSameResult) {
  ThreadsGuard guard;
  divkit::set_num_threads(2);
  Problem p;
  const float parent = p.loss();  // a parallel region of two threads
  ASSERT_TRUE(std::isfinite(parent));
  EXPECT_FALSE(divkit::forked_single_threaded());
  const int status = in_fork_child([&] {
    if (!divkit::forked_single_threaded()) return 10;
    if (divkit::get_num_threads() != 1) return 11;
    if (p.loss() != parent) return 12;  // identical bits for any thread count
    try {
      divkit::set_num_threads(2);
      return 13;
    } catch (const divkit::Error& e) {
      if (std::string(e.what()).rfind("set_num_threads: n = 2 in a process forked", 0) != 0)
        return 14;
    }
    divkit::set_num_threads(1);  // allowed
    if (p.loss() != parent) return 15;
    // A grandchild too.
    const pid_t pid = fork();
    if (pid == 0) _exit(divkit::forked_single_threaded() && p.loss() == parent ? 0 : 16);
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 17;
  });
  EXPECT_EQ(status, 0) << "-100: the child hung (killed by the watchdog)";
  // The parent keeps its threads.
  EXPECT_EQ(divkit::get_num_threads(), 2);
  EXPECT_EQ(p.loss(), parent);
}

}  // namespace
}  // namespace divkit_test
