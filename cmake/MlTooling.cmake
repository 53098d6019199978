# Checks over the project's own C code, as build targets (deploy/test.sh
# runs them first in CI):
#
#   format        rewrites every .c/.h with clang-format (.clang-format)
#   format-check  fails, listing the files clang-format would change
#   cppcheck      static analysis (configuration in cmake/cppcheck/); fails
#                 on any finding
#   lint          format-check and cppcheck
#
# "Own code" is every .c and .h under the folders in ML_SOURCE_DIRS, found
# when the target runs (so a file added since configuring is checked too).
# Never the build trees, which hold the C that protoc-c generates.

set(ML_SOURCE_DIRS lib broker clients tests)

find_program(ML_CLANG_FORMAT NAMES clang-format clang-format-14)
find_program(ML_CPPCHECK NAMES cppcheck)
string(REPLACE ";" "," ml_dirs_arg "${ML_SOURCE_DIRS}")

foreach(mode format check)
  if(mode STREQUAL "format")
    set(target format)
    set(what "clang-format: rewriting the project's C files")
  else()
    set(target format-check)
    set(what "clang-format: checking the project's C files")
  endif()
  add_custom_target(${target}
    COMMAND ${CMAKE_COMMAND} -DMODE=${mode} -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
            -DDIRS=${ml_dirs_arg} -DCLANG_FORMAT=${ML_CLANG_FORMAT}
            -P ${PROJECT_SOURCE_DIR}/cmake/format.cmake
    COMMENT "${what}"
    VERBATIM)
endforeach()

# cppcheck reads the generated protobuf headers (for the types) but reports
# nothing in them: findings in the build tree are suppressed.
cmake_host_system_information(RESULT ML_NCPU QUERY NUMBER_OF_LOGICAL_CORES)
set(ML_CPPCHECK_ARGS
  --std=c11
  --enable=warning,style,performance,portability
  --error-exitcode=1
  --quiet
  --template=gcc
  -j ${ML_NCPU}
  # Not gnu.cfg: the project uses next to no GNU extension (memmem in two
  # tests), and cppcheck 2.10's gnu.cfg marks accept4()'s addrlen not-null,
  # although accept(2) documents accept4(fd, NULL, NULL, flags).
  --library=posix
  --library=openssl
  --library=sqlite3
  --library=${PROJECT_SOURCE_DIR}/cmake/cppcheck/criterion.cfg
  --suppressions-list=${PROJECT_SOURCE_DIR}/cmake/cppcheck/suppressions.txt
  "--suppress=*:${PROJECT_BINARY_DIR}/*"
  # The one configuration the project is built in (every target gets
  # _GNU_SOURCE from ml_warnings); checking each #ifdef combination of the
  # system headers' macros would only be slower.
  -D_GNU_SOURCE
  -I lib -I broker -I clients/agent -I clients/ctl
  -I tests/unit -I tests/integration
  -I ${PROJECT_BINARY_DIR}/proto/gen)
if(ML_CPPCHECK)
  add_custom_target(cppcheck
    COMMAND ${ML_CPPCHECK} ${ML_CPPCHECK_ARGS} ${ML_SOURCE_DIRS}
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
    COMMENT "cppcheck: analysing ${ML_SOURCE_DIRS}"
    VERBATIM)
  # The generated headers must exist before cppcheck reads them.
  add_dependencies(cppcheck medlink_proto)
else()
  add_custom_target(cppcheck
    COMMAND ${CMAKE_COMMAND} -E echo "cppcheck not found: apt-get install cppcheck"
    COMMAND ${CMAKE_COMMAND} -E false
    VERBATIM)
endif()

add_custom_target(lint)
add_dependencies(lint format-check cppcheck)
