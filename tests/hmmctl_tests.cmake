# hmmctl (userlib/hmmctl): the JSON reader, the residency replay, the PNG and SVG writers, the
# bitmap font, and the binary itself run as a child (tests/hmmctl/cli_test.cpp).
hmmkit_test(hmmctl_unit_test
  SOURCES hmmctl/json_reader_test.cpp hmmctl/replay_test.cpp hmmctl/image_test.cpp
    hmmctl/font_test.cpp
  LIBS hmmctl_core)
target_include_directories(hmmctl_unit_test PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/hmmctl)

hmmkit_test(hmmctl_cli_test SOURCES hmmctl/cli_test.cpp LIBS hmmctl_core)
target_include_directories(hmmctl_cli_test PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/hmmctl)
target_compile_definitions(hmmctl_cli_test PRIVATE HMMCTL_BIN="$<TARGET_FILE:hmmctl>")
# The end-to-end test runs the vector_add sample through hmmctl.
add_dependencies(hmmctl_cli_test hmmctl vector_add)
