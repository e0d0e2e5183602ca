# Tests of the emulated device (driver/emu). Included from tests/CMakeLists.txt.

# hmmkit::emu_mmu: device page table, MMU + TLBs, fault queue.
hmmkit_test(device_page_table_test SOURCES unit/device_page_table_test.cpp LIBS hmmkit::emu_mmu)
hmmkit_test(mmu_test SOURCES unit/mmu_test.cpp LIBS hmmkit::emu_mmu)
hmmkit_test(fault_queue_test SOURCES unit/fault_queue_test.cpp LIBS hmmkit::emu_mmu)
