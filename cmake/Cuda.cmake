# CUDA detection only: sets UHMM_HAVE_CUDA (and UHMM_CUDA_COMPILER) but
# builds nothing with it yet. The CUDA language is NOT enabled.
include_guard(GLOBAL)
include(CheckLanguage)

set(UHMM_HAVE_CUDA OFF)
set(UHMM_CUDA_COMPILER "")

check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(UHMM_CUDA_COMPILER "${CMAKE_CUDA_COMPILER}")
elseif(EXISTS "/usr/local/cuda/bin/nvcc")
  set(UHMM_CUDA_COMPILER "/usr/local/cuda/bin/nvcc")
endif()

if(UHMM_CUDA_COMPILER)
  set(UHMM_HAVE_CUDA ON)
  message(STATUS "uhmm: CUDA toolkit found (${UHMM_CUDA_COMPILER}); no CUDA targets are built yet")
else()
  message(STATUS "uhmm: CUDA not found; only the simulated device is available")
endif()
