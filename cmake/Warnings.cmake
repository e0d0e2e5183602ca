# Warning flags applied to every hmmkit target through hmmkit_warnings().
add_library(hmmkit_warnings INTERFACE)
target_compile_options(hmmkit_warnings INTERFACE -Wall -Wextra -Wshadow -Wnon-virtual-dtor
  -Wcast-align -Woverloaded-virtual -Wimplicit-fallthrough)
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  # The compiler checks the lock order written in the annotations (mirror/base/.../thread_annotations.hpp).
  target_compile_options(hmmkit_warnings INTERFACE -Wthread-safety)
endif()
if(HMMKIT_WERROR)
  target_compile_options(hmmkit_warnings INTERFACE -Werror)
endif()

function(hmmkit_warnings target)
  target_link_libraries(${target} PRIVATE $<BUILD_INTERFACE:hmmkit_warnings>)
endfunction()
