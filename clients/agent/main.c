/* medlink-agent: command line, configuration, signals and the loop. All the
 * work is in agent.c; this file only starts it, stops it cleanly on SIGINT
 * or SIGTERM (stop scanning, commit what is waiting, close the channel and
 * handles, let the loop run dry, exit 0) and reloads the configuration on
 * SIGHUP: the keys a running agent can take (log level and format, scan
 * period, send windows, retention) apply at once, a changed key that needs a
 * restart is logged as a warning and keeps its running value, and a file
 * that does not load changes nothing. Under systemd (Type=notify) it says
 * READY=1, RELOADING=1/READY=1 and STOPPING=1 and pings the watchdog from
 * its loop (lib/ml_sdnotify.h). */
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
#include "ml_sdnotify.h"

#ifndef ML_VERSION
#define ML_VERSION "0.1.0"
#endif

typedef struct {
    ml_agent_t *agent;
    const char *path;  /* the configuration file, read again on SIGHUP */
    ml_aconfig_t *cfg; /* what runs: start-up values plus what reloads applied */
    uv_signal_t sigint;
    uv_signal_t sigterm;
    uv_signal_t sighup;
    ml_sdnotify_watchdog_t watchdog;
} s_main_t;

static void s_usage(FILE *f)
{
    fprintf(f, "usage: medlink-agent --config FILE [--check-config]\n"
               "       medlink-agent --check-config FILE\n"
               "       medlink-agent --generate-key PATH\n"
               "       medlink-agent --version | --help\n"
               "\n"
               "Store-and-forward agent of a medlink node. Reads the [agent] section of FILE\n"
               "(node_id, broker, ca, cert, key, data_dir, spool_dir, log_level, log_format,\n"
               "heartbeat_ms, scan_ms, max_record, send_window, send_window_bytes, chunk_size,\n"
               "store_key, store_old_keys). SIGHUP reloads it (log level and format, scan and\n"
               "send limits, retention; other changes need a restart).\n"
               "Drop NAME.json into spool_dir/outbox/ to send (an imaging consult with its\n"
               "DICOM files in outbox/NAME.d/); delivered messages appear as\n"
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
    ml_sdnotify_stopping("shutting down");
    ml_sdnotify_watchdog_close(&m->watchdog);
    ml_agent_stop(m->agent);
    uv_close((uv_handle_t *)&m->sigint, NULL);
    uv_close((uv_handle_t *)&m->sigterm, NULL);
    uv_close((uv_handle_t *)&m->sighup, NULL);
}

static const char *s_level_name(int level)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    return names[level & 3];
}

/* SIGHUP: the file is loaded as at start (the same checks); if it does not
 * load nothing changes. Otherwise the live keys apply and the others keep
 * their running values, each change that needs a restart named in one
 * warning. systemd hears RELOADING=1 first and READY=1 when it is over. */
static void s_reload_cb(uv_signal_t *h, int signum)
{
    s_main_t *m = h->data;
    (void)signum;
    ml_log(ML_LOG_INFO, "agent", "SIGHUP received; reloading %s", m->path);
    ml_sdnotify_reloading("reloading the configuration");
    ml_aconfig_t next;
    char err[2048];
    if (ml_aconfig_load(m->path, &next, err, sizeof err) < 0) {
        ml_log(ML_LOG_ERROR, "agent", "reload refused, the running configuration stays: %s", err);
        char status[600];
        snprintf(status, sizeof status, "running; reload refused, old configuration kept: %.400s",
                 err);
        ml_sdnotify_ready(status);
        return;
    }
    char keys[512];
    if (ml_aconfig_restart_keys(m->cfg, &next, keys, sizeof keys) > 0)
        ml_log(ML_LOG_WARN, "agent",
               "reload: %s changed; that needs a restart (the running values stay until then)",
               keys);
    /* What the reload changes is logged under the level that was in force
     * when the signal came; the new level and format apply last. */
    ml_agent_reload(m->agent, &next);
    if (next.log_level != m->cfg->log_level) {
        /* Said under the more verbose of the two levels, so that it shows
         * whenever either would show it. */
        if (next.log_level < m->cfg->log_level)
            ml_log_set_level(next.log_level);
        ml_log(ML_LOG_INFO, "agent", "reload: log_level %s -> %s", s_level_name(m->cfg->log_level),
               s_level_name(next.log_level));
        ml_log_set_level(next.log_level);
    }
    if (next.log_format != m->cfg->log_format) {
        ml_log_set_format(next.log_format);
        ml_log(ML_LOG_INFO, "agent", "reload: log_format now %s",
               next.log_format == ML_LOG_FORMAT_JSON ? "json" : "text");
    }
    ml_aconfig_live_apply(m->cfg, &next);
    ml_aconfig_clear(&next);
    ml_log(ML_LOG_INFO, "agent", "reloaded %s", m->path);
    ml_sdnotify_ready("running; configuration reloaded");
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
    ml_log_set_format(cfg.log_format);
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
    m.path = config;
    m.cfg = &cfg;
    uv_loop_init(&loop);
    /* Signals first: a SIGTERM that arrives while the agent is still
     * opening its store must stop it cleanly, not kill it (the signal is
     * held by libuv and handled once the loop runs). */
    uv_signal_init(&loop, &m.sigint);
    uv_signal_init(&loop, &m.sigterm);
    uv_signal_init(&loop, &m.sighup);
    m.sigint.data = m.sigterm.data = m.sighup.data = &m;
    uv_signal_start(&m.sigint, s_signal_cb, SIGINT);
    uv_signal_start(&m.sigterm, s_signal_cb, SIGTERM);
    uv_signal_start(&m.sighup, s_reload_cb, SIGHUP);
    if (ml_agent_new(&loop, &cfg, &m.agent, err, sizeof err) < 0) {
        ml_log(ML_LOG_ERROR, "agent", "%s", err);
        uv_close((uv_handle_t *)&m.sigint, NULL);
        uv_close((uv_handle_t *)&m.sigterm, NULL);
        uv_close((uv_handle_t *)&m.sighup, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        goto out;
    }
    /* The store is open, crash recovery done, the spool folders made and
     * the channel started: files dropped in outbox/ are taken from now on
     * (the broker may still be out of reach; that is the agent's normal
     * state, shown in STATUS by the log, not a start-up failure). */
    {
        char status[600];
        snprintf(status, sizeof status, "node %s, spool %s, broker %s", cfg.node_id, cfg.spool_dir,
                 cfg.broker);
        ml_sdnotify_ready(status);
    }
    ml_sdnotify_watchdog_init(&loop, &m.watchdog);
    uv_run(&loop, UV_RUN_DEFAULT);
    ml_sdnotify_watchdog_close(&m.watchdog);
    uv_run(&loop, UV_RUN_DEFAULT);
    ml_agent_destroy(&m.agent);
    ml_log(ML_LOG_INFO, "agent", "stopped");
    rc = 0;
out:
    uv_loop_close(&loop);
    ml_aconfig_clear(&cfg);
    return rc;
}
