# stress.replay: the same seed, run twice, must choose the same operations (same digest).
# Usage: cmake -DSTRESS=<hmmkit_stress> -DSEED=<n> -DOPS=<n> -P replay_check.cmake
foreach(run 1 2)
  execute_process(COMMAND ${STRESS} --seed ${SEED} --ops ${OPS} --digest
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "run ${run}:\n${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "run ${run} failed with ${rc}")
  endif()
  if(NOT out MATCHES "digest: ([0-9a-f]+)")
    message(FATAL_ERROR "run ${run} printed no digest")
  endif()
  set(digest${run} ${CMAKE_MATCH_1})
endforeach()
if(NOT digest1 STREQUAL digest2)
  message(FATAL_ERROR "seed ${SEED}: digests differ: ${digest1} vs ${digest2}")
endif()
message(STATUS "seed ${SEED}: digest ${digest1} both times")
