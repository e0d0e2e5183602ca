# Randomized stress with a shadow oracle (area "stress"): a standalone program, not GoogleTest.
# It runs seeded workloads on the emulated device over several kinds of mapping and checks every
# byte against a shadow copy after every step. See tests/stress/README.md.
add_executable(hmmkit_stress
  stress/main.cpp
  stress/options.cpp
  stress/mapping.cpp
  stress/oracle.cpp
  stress/injector.cpp
  stress/workload.cpp
  stress/thread_dump.cpp)
target_link_libraries(hmmkit_stress PRIVATE hmmkit::svm hmmkit::interpose Threads::Threads)
# The interposer is found at run time (dlsym); nothing references it at link time, so keep it.
target_link_options(hmmkit_stress PRIVATE "LINKER:--no-as-needed")
hmmkit_warnings(hmmkit_stress)

# Sanitized builds run several times slower: shorter budgets keep the lanes within their timeouts.
# (under ASan/TSan the device uses page-sized ranges: one step can take a minute).
if(HMMKIT_SANITIZE)
  set(_stress_budget 40)
  set(_stress_inject_budget 20)
  set(_stress_replay_ops 25)
  set(_stress_step_timeout 300)
else()
  set(_stress_budget 90)
  set(_stress_inject_budget 30)
  set(_stress_replay_ops 60)
  set(_stress_step_timeout 120)
endif()

add_test(NAME stress.budget COMMAND hmmkit_stress --seconds ${_stress_budget} --ops 150
  --step-timeout ${_stress_step_timeout})
add_test(NAME stress.inject COMMAND hmmkit_stress --inject --seconds ${_stress_inject_budget}
  --ops 100 --step-timeout ${_stress_step_timeout})
# The same seed must choose the same operations: two runs print the same digest.
add_test(NAME stress.replay COMMAND ${CMAKE_COMMAND} -DSTRESS=$<TARGET_FILE:hmmkit_stress>
  -DSEED=20261122 -DOPS=${_stress_replay_ops} -P ${CMAKE_CURRENT_SOURCE_DIR}/stress/replay_check.cmake)
# The oracle itself: a bit flipped behind its back must be reported (with the replay line).
add_test(NAME stress.detects COMMAND hmmkit_stress --seed 7 --ops 20 --corrupt-at 5)
set_tests_properties(stress.detects PROPERTIES TIMEOUT 600
  PASS_REGULAR_EXPRESSION "oracle after op #5: mapping .*replay: hmmkit_stress --seed 7 --ops 20")
# The watchdog: a step that does not return is reported with every thread's state (/proc's wait
# channel and system call; gdb's backtraces where gdb is installed) and the replay line.
add_test(NAME stress.detects_hang COMMAND hmmkit_stress --seed 7 --ops 20 --hang-at 3
  --step-timeout 2)
set_tests_properties(stress.detects_hang PROPERTIES TIMEOUT 300
  PASS_REGULAR_EXPRESSION "threads \\(/proc/self/task.*hmmkit-events.*(backtraces \\(gdb|no gdb on PATH).*a step ran for [0-9]+ s: a hang.*replay: hmmkit_stress --seed 7 --ops 20")
# Well above the budgets: a budget ends between steps, and a step may take long when sanitized.
set_tests_properties(stress.budget stress.inject stress.replay PROPERTIES TIMEOUT 600)
