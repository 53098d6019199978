# What `cmake --install` (and the Debian packages, deploy/package.sh) put
# where: the programs, deploy/pki.sh as medlink-pki, the systemd units with
# their sysusers.d and tmpfiles.d files, and the man pages. The units in
# deploy/systemd name the programs under /usr/bin; the installed copies name
# them under this build's bindir, so a /usr/local install gets units that
# run /usr/local/bin/medlinkd.
include(GNUInstallDirs)

set(ML_SYSTEMD_UNITDIR "lib/systemd/system" CACHE STRING
    "Where the systemd units go (relative to the prefix, or absolute: Debian 12 wants /lib/systemd/system)")
# sysusers.d and tmpfiles.d live under lib/ whatever the multiarch libdir.
set(ML_SYSUSERS_DIR "${CMAKE_INSTALL_PREFIX}/lib/sysusers.d" CACHE STRING "sysusers.d folder")
set(ML_TMPFILES_DIR "${CMAKE_INSTALL_PREFIX}/lib/tmpfiles.d" CACHE STRING "tmpfiles.d folder")

install(PROGRAMS ${PROJECT_SOURCE_DIR}/deploy/pki.sh DESTINATION ${CMAKE_INSTALL_BINDIR}
        RENAME medlink-pki)

set(ml_units medlinkd.service medlink-agent@.service medlink-crl.service medlink-crl.timer)
foreach(u ${ml_units})
  set(src ${PROJECT_SOURCE_DIR}/deploy/systemd/${u})
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${src})
  file(READ ${src} text)
  string(REPLACE "/usr/bin/" "${CMAKE_INSTALL_FULL_BINDIR}/" text "${text}")
  file(WRITE ${PROJECT_BINARY_DIR}/systemd/${u} "${text}")
  install(FILES ${PROJECT_BINARY_DIR}/systemd/${u} DESTINATION ${ML_SYSTEMD_UNITDIR})
endforeach()
install(FILES ${PROJECT_SOURCE_DIR}/deploy/systemd/medlink.sysusers DESTINATION ${ML_SYSUSERS_DIR}
        RENAME medlink.conf)
install(FILES ${PROJECT_SOURCE_DIR}/deploy/systemd/medlink.tmpfiles DESTINATION ${ML_TMPFILES_DIR}
        RENAME medlink.conf)

foreach(page medlinkd.8 medlink-agent.8 medlinkctl.1 medlink-pki.1 medlinkd.ini.5
             medlink-agent.ini.5 medlinkctl.ini.5)
  string(REGEX MATCH "[0-9]$" sec ${page})
  install(FILES ${PROJECT_SOURCE_DIR}/docs/man/${page} DESTINATION ${CMAKE_INSTALL_MANDIR}/man${sec})
endforeach()
