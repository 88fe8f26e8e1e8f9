# Third-party dependencies, all from Debian 12 packages (scripts/setup.sh).
# Imported targets:
#   Threads::Threads
#   fmt::fmt                        (libfmt-dev, 9.1)
#   spdlog::spdlog                  (libspdlog-dev, 1.10, uses external fmt)
#   CLI11::CLI11                    (libcli11-dev, 2.1, header-only)
#   nlohmann_json::nlohmann_json    (nlohmann-json3-dev, 3.11)
#   GTest::gtest GTest::gtest_main GTest::gmock GTest::gmock_main  (tests only)
#   benchmark::benchmark            (libbenchmark-dev, 1.7; bench only)
include_guard(GLOBAL)

set(THREADS_PREFER_PTHREAD_FLAG ON)
find_package(Threads REQUIRED)

find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json REQUIRED)

find_package(CLI11 CONFIG QUIET)
if(NOT TARGET CLI11::CLI11)
  # Fallback: header-only CLI11 without a CMake package config.
  find_path(UHMM_CLI11_INCLUDE_DIR NAMES CLI/CLI.hpp)
  if(NOT UHMM_CLI11_INCLUDE_DIR)
    message(FATAL_ERROR "CLI11 not found (install libcli11-dev: scripts/setup.sh)")
  endif()
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  set_target_properties(CLI11::CLI11 PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${UHMM_CLI11_INCLUDE_DIR}")
  message(STATUS "uhmm: CLI11 (header-only fallback) in ${UHMM_CLI11_INCLUDE_DIR}")
endif()

if(UHMM_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

if(UHMM_BUILD_BENCH)
  find_package(benchmark REQUIRED)
endif()
