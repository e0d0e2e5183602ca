# Install rules: the libraries with a CMake package (find_package(hmmkit) -> hmmkit::base,
# hmmkit::mirror, hmmkit::interpose for mirroring; hmmkit::dma, hmmkit::driver, hmmkit::emu_mmu,
# hmmkit::drm for drivers; hmmkit::svm for applications) and a pkg-config file (hmmkit.pc: base and
# mirror). The mirror headers and hmmctl are installed by their own directories, the others here.
# scripts/check-install.sh builds consumers against both and runs an SVM application.
include(CMakePackageConfigHelpers)

set(HMMKIT_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/hmmkit)

# The public headers use C++20 (std::span): consumers need it too.
target_compile_features(hmmkit_base PUBLIC cxx_std_20)

install(TARGETS hmmkit_base hmmkit_mirror hmmkit_interpose hmmkit_dma hmmkit_driver hmmkit_emu_mmu
  hmmkit_drm hmmkit_svm
  EXPORT hmmkitTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

install(DIRECTORY
  ${PROJECT_SOURCE_DIR}/dma/include/
  ${PROJECT_SOURCE_DIR}/driver/include/
  ${PROJECT_SOURCE_DIR}/driver/emu/include/
  ${PROJECT_SOURCE_DIR}/driver/drm/include/
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_SOURCE_DIR}/userlib/include/hmmkit/svm.hpp
  ${PROJECT_SOURCE_DIR}/userlib/include/hmmkit/svm.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/hmmkit)

install(EXPORT hmmkitTargets
  NAMESPACE hmmkit::
  FILE hmmkitTargets.cmake
  DESTINATION ${HMMKIT_CMAKE_DIR})

configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/hmmkitConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/hmmkitConfig.cmake
  INSTALL_DESTINATION ${HMMKIT_CMAKE_DIR})
# 0.x: minor versions may break the API.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/hmmkitConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${CMAKE_CURRENT_BINARY_DIR}/hmmkitConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/hmmkitConfigVersion.cmake
  DESTINATION ${HMMKIT_CMAKE_DIR})

# pkg-config: paths relative to the .pc file, so that `cmake --install --prefix DIR` relocates.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(HMMKIT_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(HMMKIT_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
  set(HMMKIT_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
else()
  file(RELATIVE_PATH _hmmkit_up "/p/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/p")
  string(REGEX REPLACE "/$" "" _hmmkit_up "${_hmmkit_up}")
  set(HMMKIT_PC_PREFIX "\${pcfiledir}/${_hmmkit_up}")
  set(HMMKIT_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
  set(HMMKIT_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
set(HMMKIT_PC_LIBS_PRIVATE "-pthread")
foreach(lib IN LISTS CMAKE_DL_LIBS)
  string(APPEND HMMKIT_PC_LIBS_PRIVATE " -l${lib}")
endforeach()
configure_file(${CMAKE_CURRENT_LIST_DIR}/hmmkit.pc.in ${CMAKE_CURRENT_BINARY_DIR}/hmmkit.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/hmmkit.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
