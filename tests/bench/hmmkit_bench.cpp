// The benchmark suite as its own program (the same as `hmmctl bench`).
#include <span>

#include "bench_suite.hpp"

int main(int argc, char** argv) {
  std::span<char* const> args(argv, size_t(argc));
  return hmmkit::bench::BenchMain(args.subspan(1));
}
