/* sandbox: runs a program under the system call restrictions of a systemd
 * unit, for tests/deploy/test_sandbox.sh, on machines where systemd is not
 * PID 1 and the unit itself cannot be started. It installs a seccomp filter
 * equivalent to the unit's
 *
 *   SystemCallFilter=   an allow list of syscalls (read from a file, one
 *                       name a line, as test_sandbox.sh expands the unit's
 *                       groups with systemd-analyze syscall-filter);
 *   SystemCallErrorNumber=EPERM   anything else fails with EPERM;
 *   RestrictAddressFamilies=      socket(2) of another family fails with
 *                                 EAFNOSUPPORT, as systemd does;
 *   NoNewPrivileges=yes
 *
 * then execs the program. Usage: sandbox SYSCALL_FILE FAMILY[,FAMILY...] PROGRAM ARGS...
 * (families as numbers). The syscall numbers come from s_table, which the
 * test generates from <sys/syscall.h> into sandbox-nr.h. */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static const struct {
    const char *name;
    long nr;
} s_table[] = {
#include "sandbox-nr.h"
};

#define S_MAX 4096

static long s_lookup(const char *name)
{
    for (size_t i = 0; i < sizeof s_table / sizeof s_table[0]; i++)
        if (strcmp(s_table[i].name, name) == 0)
            return s_table[i].nr;
    return -1;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: sandbox SYSCALL_FILE FAMILIES PROGRAM ARGS...\n");
        return 2;
    }
    static struct sock_filter f[S_MAX];
    size_t n = 0;
    f[n++] =
        (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));

    /* socket(2): allowed only for the listed families. */
    long fam[32];
    size_t nfam = 0;
    char *save = NULL;
    for (char *p = strtok_r(argv[2], ",", &save); p && nfam < 32; p = strtok_r(NULL, ",", &save))
        fam[nfam++] = strtol(p, NULL, 10);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socket, 0,
                                          (unsigned char)(2 * nfam + 3));
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                          offsetof(struct seccomp_data, args[0]));
    for (size_t i = 0; i < nfam; i++) {
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)fam[i], 0, 1);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EAFNOSUPPORT);
    /* Reload the syscall number for the list below. */
    f[n++] =
        (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));

    FILE *in = fopen(argv[1], "r");
    if (!in) {
        perror(argv[1]);
        return 2;
    }
    char line[128];
    while (fgets(line, sizeof line, in)) {
        line[strcspn(line, "\r\n")] = '\0';
        long nr = s_lookup(line);
        if (nr < 0 || strcmp(line, "socket") == 0)
            continue; /* not on this architecture, or handled above */
        if (n + 3 >= S_MAX) {
            fprintf(stderr, "sandbox: too many syscalls\n");
            return 2;
        }
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    fclose(in);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);

    struct sock_fprog prog = {(unsigned short)n, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("sandbox: seccomp");
        return 2;
    }
    execv(argv[3], argv + 3);
    perror("sandbox: exec");
    return 127;
}
