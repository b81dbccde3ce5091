# The Hopper grouped GEMM family (epmoe/experts/sm90/), included at the end of CMakeLists.txt.
# Needs CUDA and the CUTLASS/CuTe headers of PyPI's nvidia-cutlass wheel (scripts/fetch-cutlass.sh
# puts them in third_party/cutlass-4.2.0/). Without them the launchers are still built and report
# kUnsupported, and the tests skip.

# FP8 block quantisation on the host (the loader, the tests and the CPU reference use it).
target_sources(epmoe PRIVATE epmoe/weights/fp8_block.cc)

# Bench-only FP8 tile candidates (sm90_gemm_tune.cuh), timed by `epmoe bench --kernel gemm`
# beside the production kernel. Off by default: three more CUTLASS units would lengthen every CI
# build; a GPU check that runs the bench configures with -DEPMOE_SM90_TUNING=ON.
option(EPMOE_SM90_TUNING "Build the bench-only sm90 FP8 tile candidates (sm90_gemm_tune.cuh)" OFF)

if(EPMOE_CUDA)
  set(EPMOE_CUTLASS_DIR "${CMAKE_CURRENT_SOURCE_DIR}/third_party/cutlass-4.2.0" CACHE PATH
      "CUTLASS headers: a folder with include/cutlass/cutlass.h and tools/util/include/ (an unzipped nvidia-cutlass wheel's cutlass_library/source works too)")
  set(EPMOE_SM90_GEMM OFF)
  if(EXISTS "${EPMOE_CUTLASS_DIR}/include/cutlass/cutlass.h" AND
     EXISTS "${EPMOE_CUTLASS_DIR}/tools/util/include/cutlass/util/packed_stride.hpp")
    set(EPMOE_SM90_GEMM ON)
    file(STRINGS "${EPMOE_CUTLASS_DIR}/include/cutlass/version.h" _cutlass_defs
         REGEX "^#define CUTLASS_(MAJOR|MINOR|PATCH) ")
    string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*" "\\1" _cl_major "${_cutlass_defs}")
    string(REGEX REPLACE ".*CUTLASS_MINOR ([0-9]+).*" "\\1" _cl_minor "${_cutlass_defs}")
    message(STATUS "CUTLASS ${_cl_major}.${_cl_minor} at ${EPMOE_CUTLASS_DIR}: the sm90 grouped GEMM is built")
  else()
    message(STATUS "CUTLASS not found at EPMOE_CUTLASS_DIR=${EPMOE_CUTLASS_DIR} (run scripts/fetch-cutlass.sh): the sm90 grouped GEMM is left out")
  endif()

  target_sources(epmoe_cuda PRIVATE epmoe/experts/sm90/sm90_grouped_gemm.cu)
  if(EPMOE_SM90_GEMM)
    # One CUTLASS kernel per unit: they compile in parallel and an edit rebuilds one.
    set(_sm90_units
      epmoe/experts/sm90/sm90_gemm_bf16_bf16.cu
      epmoe/experts/sm90/sm90_gemm_bf16_f32.cu
      epmoe/experts/sm90/sm90_gemm_fp8_bf16.cu
      epmoe/experts/sm90/sm90_gemm_fp8_f32.cu
      epmoe/experts/sm90/sm90_gemm_bf16_bf16_signal.cu
      epmoe/experts/sm90/sm90_gemm_fp8_bf16_signal.cu)
    set(_sm90_launcher_defs EPMOE_WITH_CUTLASS=1)
    if(EPMOE_SM90_TUNING)
      list(APPEND _sm90_units
        epmoe/experts/sm90/sm90_gemm_fp8_tune_pingpong.cu
        epmoe/experts/sm90/sm90_gemm_fp8_tune_cluster2x1.cu
        epmoe/experts/sm90/sm90_gemm_fp8_tune_cluster1x2.cu)
      list(APPEND _sm90_launcher_defs EPMOE_SM90_TUNING=1)
      message(STATUS "EPMOE_SM90_TUNING: the bench-only FP8 candidates are built")
    endif()
    target_sources(epmoe_cuda PRIVATE ${_sm90_units})
    # -isystem: CUTLASS's own warnings are not epmoe's.
    target_include_directories(epmoe_cuda SYSTEM PRIVATE "${EPMOE_CUTLASS_DIR}/include"
                                                         "${EPMOE_CUTLASS_DIR}/tools/util/include")
    # NOTES: NDEBUG in every build type: a device assert is a function call, and ptxas serialises
    # wgmma across calls (warning C7510), which costs the kernel its MMA pipelining.
    set_source_files_properties(${_sm90_units} PROPERTIES COMPILE_DEFINITIONS NDEBUG)
    set_source_files_properties(epmoe/experts/sm90/sm90_grouped_gemm.cu PROPERTIES
                                COMPILE_DEFINITIONS "${_sm90_launcher_defs}")
  endif()
  if(EPMOE_BUILD_TESTS AND TARGET epmoe_gpu_tests)
    target_sources(epmoe_gpu_tests PRIVATE tests/gpu/test_sm90_gemm.cc tests/gpu/sm90_signal_probe.cu)
  endif()
endif()
