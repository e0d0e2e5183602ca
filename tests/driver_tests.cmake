# driver/ test suites (included from tests/CMakeLists.txt).
hmmkit_test(device_memory_test SOURCES unit/device_memory_test.cpp LIBS hmmkit::driver)
hmmkit_test(svm_manager_test SOURCES unit/svm_manager_test.cpp LIBS hmmkit::driver hmmkit::dma)
hmmkit_test(svm_attributes_test SOURCES unit/svm_attributes_test.cpp LIBS hmmkit::driver)
hmmkit_test(device_migration_test SOURCES unit/device_migration_test.cpp LIBS hmmkit::driver hmmkit::dma)

# The DRM backend. The vgem tests skip without vgem; CI runs them in the qemu guest lane.
if(TARGET hmmkit::drm)
  hmmkit_test(drm_vgem_test SOURCES unit/drm_vgem_test.cpp LIBS hmmkit::drm)
endif()
if(TARGET hmmkit::drm)
  hmmkit_test(drm_kernel_svm_test SOURCES unit/drm_kernel_svm_test.cpp LIBS hmmkit::drm)
endif()
