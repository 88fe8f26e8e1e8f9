# uhmm_add_layer(<name> SOURCES <src>... [DEPS <target>...] [PRIVATE_DEPS <target>...])
#
# Creates the STATIC library uhmm_<name> with the alias uhmm::<name>.
#   - PUBLIC  include dir: ${PROJECT_SOURCE_DIR}/include
#   - PRIVATE include dir: ${PROJECT_SOURCE_DIR}/src
#   - DEPS are linked PUBLIC, PRIVATE_DEPS PRIVATE
#   - position-independent code (the preload .so links these archives)
#   - the project's warnings (uhmm_set_warnings)
# With no SOURCES an INTERFACE (header-only) library is created instead.
include_guard(GLOBAL)

function(uhmm_add_layer name)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "" "SOURCES;DEPS;PRIVATE_DEPS")
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "uhmm_add_layer(${name}): unexpected arguments: ${ARG_UNPARSED_ARGUMENTS}")
  endif()

  set(target uhmm_${name})

  if(NOT ARG_SOURCES)
    add_library(${target} INTERFACE)
    add_library(uhmm::${name} ALIAS ${target})
    target_include_directories(${target} INTERFACE ${PROJECT_SOURCE_DIR}/include)
    target_compile_features(${target} INTERFACE cxx_std_20)
    if(ARG_DEPS)
      target_link_libraries(${target} INTERFACE ${ARG_DEPS})
    endif()
    return()
  endif()

  add_library(${target} STATIC ${ARG_SOURCES})
  add_library(uhmm::${name} ALIAS ${target})
  target_include_directories(${target}
    PUBLIC  ${PROJECT_SOURCE_DIR}/include
    PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_compile_features(${target} PUBLIC cxx_std_20)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  if(ARG_DEPS)
    target_link_libraries(${target} PUBLIC ${ARG_DEPS})
  endif()
  if(ARG_PRIVATE_DEPS)
    target_link_libraries(${target} PRIVATE ${ARG_PRIVATE_DEPS})
  endif()
  uhmm_set_warnings(${target})
endfunction()
