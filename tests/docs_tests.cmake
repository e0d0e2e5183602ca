# Documentation tests (issue 8). Included from tests/CMakeLists.txt (test area "docs").
#
# 1. Every ```cpp / ```c block of docs/*.md and README.md is compiled by the normal build
#    (cmake/doc_snippets.cmake): a snippet that does not compile fails the build, and the compiler
#    names the Markdown file and line.
# 2. docs.snippet_extraction checks the extractor itself on a fixture with every kind of fence.
include(${PROJECT_SOURCE_DIR}/cmake/doc_snippets.cmake)

file(GLOB _doc_pages CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/docs/*.md)
set(_doc_libs hmmkit::base hmmkit::mirror hmmkit::dma hmmkit::driver hmmkit::emu_mmu hmmkit::svm
  hmmkit::dmirror)
if(TARGET hmmkit::drm)
  list(APPEND _doc_libs hmmkit::drm)
endif()
hmmkit_doc_snippets(hmmkit_doc_snippets
  OUTDIR ${CMAKE_CURRENT_BINARY_DIR}/doc_snippets
  DOCS ${PROJECT_SOURCE_DIR}/README.md ${_doc_pages}
  LIBS ${_doc_libs})

add_test(NAME docs.snippet_extraction
  COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
          -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/doc_snippets_selftest
          -P ${CMAKE_CURRENT_SOURCE_DIR}/docs/extract_test.cmake)
