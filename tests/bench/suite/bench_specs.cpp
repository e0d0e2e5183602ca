// The order the suite runs its groups in: cheap mirror metrics first, the device last.
#include "bench_suite.hpp"

namespace hmmkit::bench {

extern const BenchSpec kRangeFaultBench, kDeviceFaultBench, kMigrateBench, kFaultBackBench,
    kEvictBench, kVectorAddBench, kInvalidationBench, kScaleBench, kTraceOverheadBench;

std::span<const BenchSpec> AllBenches() {
  static const BenchSpec specs[] = {kRangeFaultBench,   kDeviceFaultBench, kMigrateBench,
                                    kFaultBackBench,    kEvictBench,       kVectorAddBench,
                                    kInvalidationBench, kScaleBench,       kTraceOverheadBench};
  return specs;
}

}  // namespace hmmkit::bench
