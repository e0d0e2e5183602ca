hmmkit_test(migrate_test SOURCES unit/migrate_test.cpp)
