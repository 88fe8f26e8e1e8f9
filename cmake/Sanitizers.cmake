# Global sanitizer flags, selected with -DUHMM_SANITIZE=address|thread.
# Applied with add_compile_options/add_link_options *before* any target is
# created, so every target of the project (libraries, tests, tools, the
# preload .so) is instrumented. Third-party prebuilt libraries are not.
include_guard(GLOBAL)

set(UHMM_SANITIZER_FLAGS "")
if(UHMM_SANITIZE STREQUAL "")
  # no sanitizer
elseif(UHMM_SANITIZE STREQUAL "address")
  set(UHMM_SANITIZER_FLAGS
    -fsanitize=address,undefined
    -fno-omit-frame-pointer
    -fno-sanitize-recover=all)
elseif(UHMM_SANITIZE STREQUAL "thread")
  set(UHMM_SANITIZER_FLAGS -fsanitize=thread)
else()
  message(FATAL_ERROR "UHMM_SANITIZE must be empty, 'address' or 'thread' (got '${UHMM_SANITIZE}')")
endif()

if(UHMM_SANITIZER_FLAGS)
  # Sanitizer builds are the test builds: keep the debug-tier invariant
  # checks (UHMM_DCHECK, lock ranks) on even though NDEBUG is set.
  add_compile_definitions(UHMM_SLOW_CHECKS)
  add_compile_options(${UHMM_SANITIZER_FLAGS})
  add_link_options(${UHMM_SANITIZER_FLAGS})
  message(STATUS "uhmm: sanitizer flags: ${UHMM_SANITIZER_FLAGS}")
endif()

# Runtime options for tests run under a sanitizer (applied by uhmm_add_test
# and also set in the asan/tsan test presets).
set(UHMM_TEST_ENVIRONMENT "")
if(UHMM_SANITIZE STREQUAL "address")
  set(UHMM_TEST_ENVIRONMENT
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0"
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
elseif(UHMM_SANITIZE STREQUAL "thread")
  set(UHMM_TEST_ENVIRONMENT
    "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1")
endif()
