# clang-format over the project's own C files; run by the format and
# format-check targets (cmake/MlTooling.cmake):
#
#   cmake -DMODE=check|format -DSOURCE_DIR=... -DDIRS=lib,broker,...
#         -DCLANG_FORMAT=/usr/bin/clang-format -P cmake/format.cmake
#
# MODE=check lists every file clang-format would change (with its
# diagnostics) and fails; MODE=format rewrites them in place. Files under a
# folder named build* and protoc-c output (*.pb-c.[ch]) are never touched.
if(NOT CLANG_FORMAT)
  message(FATAL_ERROR "clang-format not found: apt-get install clang-format")
endif()

string(REPLACE "," ";" dirs "${DIRS}")
set(files)
foreach(d ${dirs})
  file(GLOB_RECURSE found LIST_DIRECTORIES false RELATIVE ${SOURCE_DIR}
       ${SOURCE_DIR}/${d}/*.c ${SOURCE_DIR}/${d}/*.h)
  list(APPEND files ${found})
endforeach()
list(FILTER files EXCLUDE REGEX "(^|/)build[^/]*/")
list(FILTER files EXCLUDE REGEX "\\.pb-c\\.[ch]$")
list(SORT files)

set(bad)
foreach(f ${files})
  if(MODE STREQUAL "format")
    execute_process(COMMAND ${CLANG_FORMAT} -i --style=file ${f}
                    WORKING_DIRECTORY ${SOURCE_DIR} RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      list(APPEND bad ${f})
    endif()
  else()
    execute_process(COMMAND ${CLANG_FORMAT} --dry-run -Werror --style=file ${f}
                    WORKING_DIRECTORY ${SOURCE_DIR} RESULT_VARIABLE rc
                    OUTPUT_QUIET ERROR_VARIABLE diag)
    if(NOT rc EQUAL 0)
      list(APPEND bad ${f})
      message("${diag}")
    endif()
  endif()
endforeach()

list(LENGTH files n)
list(LENGTH bad n_bad)
if(MODE STREQUAL "format")
  if(n_bad GREATER 0)
    string(REPLACE ";" "\n  " lines "${bad}")
    message(FATAL_ERROR "clang-format failed on:\n  ${lines}")
  endif()
  message(STATUS "clang-format: ${n} files formatted")
elseif(n_bad GREATER 0)
  string(REPLACE ";" "\n  " lines "${bad}")
  message(FATAL_ERROR "${n_bad} of ${n} files are not clang-formatted:\n  ${lines}\n"
                      "Fix with: cmake --build <build dir> --target format")
else()
  message(STATUS "clang-format: ${n} files formatted correctly")
endif()
