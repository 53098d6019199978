/* medlink-agent: command line, configuration, signals and the loop. All the
 * work is in agent.c; this file only starts it and stops it cleanly on
 * SIGINT or SIGTERM (stop scanning, commit what is waiting, close the
 * channel and handles, let the loop run dry, exit 0). */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "aconfig.h"
#include "agent.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_lock.h"

#ifndef ML_VERSION
#define ML_VERSION "0.1.0"
#endif

typedef struct {
    ml_agent_t *agent;
    uv_signal_t sigint;
    uv_signal_t sigterm;
} s_main_t;

static void s_usage(FILE *f)
{
    fprintf(f, "usage: medlink-agent --config FILE [--check-config]\n"
               "       medlink-agent --check-config FILE\n"
               "       medlink-agent --generate-key PATH\n"
               "       medlink-agent --version | --help\n"
               "\n"
               "Store-and-forward agent of a medlink node. Reads the [agent] section of FILE\n"
               "(node_id, broker, ca, cert, key, data_dir, spool_dir, log_level, heartbeat_ms,\n"
               "scan_ms, max_record, send_window, send_window_bytes, chunk_size, store_key,\n"
               "store_old_keys). Drop NAME.json into spool_dir/outbox/ to send (an imaging\n"
               "consult with its DICOM files in outbox/NAME.d/); delivered messages appear as\n"
               "spool_dir/inbox/<message id>.json, received studies as inbox/study-<case>/.\n"
               "\n"
               "--check-config loads FILE as a start would, checks every file it names (exists,\n"
               "readable, private keys mode 0600, the key matches the certificate, the CA\n"
               "loads) and the folders, prints each problem and exits 1, or prints \"valid\"\n"
               "and exits 0.\n"
               "\n"
               "--generate-key writes a new random key file for store_key (64 hex digits,\n"
               "mode 0600) and never overwrites an existing file.\n");
}

static void s_signal_cb(uv_signal_t *h, int signum)
{
    s_main_t *m = h->data;
    ml_log(ML_LOG_INFO, "agent", "%s received; shutting down",
           signum == SIGINT ? "SIGINT" : "SIGTERM");
    ml_agent_stop(m->agent);
    uv_close((uv_handle_t *)&m->sigint, NULL);
    uv_close((uv_handle_t *)&m->sigterm, NULL);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
                                         {"generate-key", required_argument, NULL, 'g'},
                                         {"check-config", optional_argument, NULL, 'k'},
                                         {"version", no_argument, NULL, 'V'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *config = NULL;
    int c, check = 0;
    char err[8192];
    while ((c = getopt_long(argc, argv, "c:g:Vh", opts, NULL)) != -1) {
        switch (c) {
        case 'g':
            if (ml_keyring_generate_file(optarg, err, sizeof err) < 0) {
                fprintf(stderr, "medlink-agent: %s\n", err);
                return 1;
            }
            printf("wrote %s (mode 0600): name it as store_key in [agent]\n", optarg);
            return 0;
        case 'c':
            config = optarg;
            break;
        case 'k':
            check = 1;
            if (optarg)
                config = optarg;
            break;
        case 'V':
            printf("medlink-agent %s\n", ML_VERSION);
            return 0;
        case 'h':
            s_usage(stdout);
            return 0;
        default:
            s_usage(stderr);
            return 2;
        }
    }
    /* "--check-config FILE", as well as "--config FILE --check-config". */
    if (check && !config && optind == argc - 1)
        config = argv[optind++];
    if (!config || optind != argc) {
        s_usage(stderr);
        return 2;
    }

    ml_aconfig_t cfg;
    ml_check_t problems;
    ml_check_init(&problems);
    if (ml_aconfig_load(config, &cfg, err, sizeof err) < 0) {
        /* One line per problem (unknown keys come all at once). */
        ml_check_add_lines(&problems, err);
        ml_check_print(&problems, "medlink-agent", stderr);
        return 1;
    }
    if (check) {
        ml_aconfig_check(&cfg, config, &problems);
        ml_aconfig_clear(&cfg);
        if (problems.n) {
            ml_check_print(&problems, "medlink-agent", stderr);
            fprintf(stderr, "medlink-agent: %s is not valid (%d problem%s)\n", config, problems.n,
                    problems.n == 1 ? "" : "s");
            return 1;
        }
        printf("medlink-agent: %s is valid\n", config);
        return 0;
    }
    ml_log_set_level(cfg.log_level);
    /* One agent per data directory: two agents with one config would share
     * agent.db and the spool folders, and take turns superseding each
     * other's session at the broker. Held until the process exits. */
    int lock_fd = -1;
    if (ml_mkdirs(cfg.data_dir) != 0) {
        fprintf(stderr, "medlink-agent: cannot create data_dir %s: %s\n", cfg.data_dir,
                strerror(errno));
        ml_aconfig_clear(&cfg);
        return 1;
    }
    if (ml_lock_take(cfg.data_dir, "medlink-agent.lock", &lock_fd, err, sizeof err) != 0) {
        fprintf(stderr, "medlink-agent: %s\n", err);
        ml_log(ML_LOG_ERROR, "agent", "%s", err);
        ml_aconfig_clear(&cfg);
        return 1;
    }
    /* A broken pipe is an error to report, never a reason to die. */
    signal(SIGPIPE, SIG_IGN);

    int rc = 1;
    uv_loop_t loop;
    s_main_t m = {0};
    uv_loop_init(&loop);
    /* Signals first: a SIGTERM that arrives while the agent is still
     * opening its store must stop it cleanly, not kill it (the signal is
     * held by libuv and handled once the loop runs). */
    uv_signal_init(&loop, &m.sigint);
    uv_signal_init(&loop, &m.sigterm);
    m.sigint.data = m.sigterm.data = &m;
    uv_signal_start(&m.sigint, s_signal_cb, SIGINT);
    uv_signal_start(&m.sigterm, s_signal_cb, SIGTERM);
    if (ml_agent_new(&loop, &cfg, &m.agent, err, sizeof err) < 0) {
        ml_log(ML_LOG_ERROR, "agent", "%s", err);
        uv_close((uv_handle_t *)&m.sigint, NULL);
        uv_close((uv_handle_t *)&m.sigterm, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        goto out;
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    ml_agent_destroy(&m.agent);
    ml_log(ML_LOG_INFO, "agent", "stopped");
    rc = 0;
out:
    uv_loop_close(&loop);
    ml_aconfig_clear(&cfg);
    return rc;
}
