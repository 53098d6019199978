/* medlinkd: the medlink broker daemon.
 *
 *   medlinkd --config FILE [--check-config] [--log-level LEVEL]
 *   medlinkd --check-config FILE
 *
 * Runs one libuv loop. SIGINT and SIGTERM shut it down cleanly: sessions get
 * close_notify, the store commits what it holds, and the process exits 0.
 * SIGHUP reloads the node registry, ACL, deadlines, limits and CRL, and the
 * log level and format. Under systemd (Type=notify) it says READY=1 once it
 * listens with its store open and its queues scanned, RELOADING=1/READY=1
 * around a reload and STOPPING=1 at shutdown, and pings the watchdog from
 * its loop (lib/ml_sdnotify.h). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "broker.h"
#include "config.h"
#include "http.h"
#include "ml_common.h"
#include "ml_lock.h"
#include "ml_sdnotify.h"

#define ML_VERSION "0.1.0"

static ml_broker_t *s_broker;
static ml_sdnotify_watchdog_t s_watchdog;
static const char *s_config_path;
/* --log-level given: it wins over log_level in the file, also at reloads. */
static int s_level_from_cli;

static void s_close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void s_stop_cb(uv_signal_t *h, int signum)
{
    ml_log(ML_LOG_INFO, "broker", "received %s; shutting down", strsignal(signum));
    ml_sdnotify_stopping("shutting down");
    ml_sdnotify_watchdog_close(&s_watchdog);
    ml_broker_destroy(&s_broker);
    /* The signal handles are ours (on the stack of main); close them so the
     * loop can end once the broker's handles have closed. */
    uv_walk(h->loop, s_close_walk, NULL);
}

/* The log level and format of the file, applied after a reload that
 * succeeded. ml_broker_reload keeps its configuration to itself; the file
 * is read once more here (it was valid a moment ago; if it no longer is,
 * the running level and format stay). */
static void s_reload_logging(void)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    char err[1024];
    ml_broker_config_t *cfg = NULL;
    if (ml_broker_config_load(s_config_path, &cfg, err, sizeof err) != 0) {
        ml_log(ML_LOG_WARN, "broker", "reload: log level and format unchanged: %s", err);
        return;
    }
    int was = ml_log_get_level();
    if (!s_level_from_cli && cfg->log_level != was) {
        /* Said under the more verbose of the two levels. */
        if (cfg->log_level < was)
            ml_log_set_level(cfg->log_level);
        ml_log(ML_LOG_INFO, "broker", "reload: log_level %s -> %s", names[was & 3],
               names[cfg->log_level & 3]);
        ml_log_set_level(cfg->log_level);
    }
    if (cfg->log_format != ml_log_get_format()) {
        ml_log_set_format(cfg->log_format);
        ml_log(ML_LOG_INFO, "broker", "reload: log_format now %s",
               cfg->log_format == ML_LOG_FORMAT_JSON ? "json" : "text");
    }
    ml_broker_config_destroy(&cfg);
}

/* SIGHUP: the registry, ACL, deadlines, limits and CRL are read again (see
 * ml_broker_reload), then the log level and format; a file that does not
 * load changes nothing. systemd hears RELOADING=1 first and READY=1 when
 * it is over, whatever the outcome (the old configuration keeps running). */
static void s_reload_cb(uv_signal_t *h, int signum)
{
    (void)h;
    ml_log(ML_LOG_INFO, "broker", "received %s; reloading the configuration", strsignal(signum));
    if (!s_broker)
        return;
    ml_sdnotify_reloading("reloading the configuration");
    char err[512];
    if (ml_broker_reload(s_broker, err, sizeof err) == 0) {
        s_reload_logging();
        ml_sdnotify_ready("running; configuration reloaded");
    } else {
        char status[600];
        snprintf(status, sizeof status, "running; reload refused, old configuration kept: %.400s",
                 err);
        ml_sdnotify_ready(status);
    }
}

/* Writes the endpoints medlinkd actually bound to [broker] port_file, one
 * key=value a line ("broker=tcp://127.0.0.1:41873", then "http=ADDR:PORT"
 * when the HTTP endpoint is on), so that whoever started it with port 0
 * can find them. Atomic (a temp file in the same folder, renamed over
 * path): a reader never sees half a file. Mode 0644: ports are not secret,
 * and a monitoring user may read them. Returns 0, or ML_EIO with errno
 * kept. */
static int s_port_file_write(const char *path, const ml_broker_t *b)
{
    char text[512], dir[4096];
    const char *http = ml_bk_http_address(b);
    int n = snprintf(text, sizeof text, "broker=%s\n%s%s%s", ml_broker_endpoint(b),
                     http && *http ? "http=" : "", http && *http ? http : "",
                     http && *http ? "\n" : "");
    if (n < 0 || (size_t)n >= sizeof text ||
        snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) {
        errno = ENAMETOOLONG;
        return ML_EINVAL;
    }
    char *slash = strrchr(dir, '/');
    const char *name = slash ? slash + 1 : path;
    if (!slash)
        strcpy(dir, ".");
    else if (slash == dir)
        slash[1] = '\0';
    else
        *slash = '\0';
    /* The folder is the operator's choice (it may be a link they made); the
     * file inside is created without following links (ml_write_file_at). */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return ML_EIO;
    int rc = ml_write_file_at(dfd, name, text, (size_t)n, 0644);
    int saved = errno;
    close(dfd);
    errno = saved;
    return rc;
}

static void s_usage(FILE *f)
{
    fprintf(f, "usage: medlinkd --config FILE [--check-config] [--log-level "
               "debug|info|warn|error]\n"
               "       medlinkd --check-config FILE\n"
               "       medlinkd --version\n"
               "\n"
               "--check-config loads FILE as a start would, checks every file it names (exists,\n"
               "readable, private keys mode 0600, the key matches the certificate, the CA and\n"
               "CRL load) and data_dir, prints each problem and exits 1, or prints \"valid\"\n"
               "and exits 0.\n");
}

int main(int argc, char **argv)
{
    const char *config = NULL;
    const char *level = NULL;
    int check = 0;
    static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
                                         {"check-config", optional_argument, NULL, 'k'},
                                         {"log-level", required_argument, NULL, 'l'},
                                         {"version", no_argument, NULL, 'v'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "c:kl:vh", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config = optarg;
            break;
        case 'k':
            check = 1;
            if (optarg)
                config = optarg;
            break;
        case 'l':
            level = optarg;
            break;
        case 'v':
            printf("medlinkd %s\n", ML_VERSION);
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
    char err[8192] = "";
    ml_broker_config_t *cfg = NULL;
    if (ml_broker_config_load(config, &cfg, err, sizeof err) != 0) {
        /* One line per problem (unknown keys come all at once). */
        ml_check_t problems;
        ml_check_init(&problems);
        ml_check_add_lines(&problems, err);
        ml_check_print(&problems, "medlinkd", stderr);
        return 1;
    }
    ml_log_set_level(cfg->log_level);
    ml_log_set_format(cfg->log_format);
    s_config_path = config;
    size_t n_nodes = cfg->n_nodes;
    if (level) {
        int lv;
        if (ml_log_parse_level(level, &lv) != 0) {
            fprintf(stderr, "medlinkd: unknown log level '%s'\n", level);
            ml_broker_config_destroy(&cfg);
            return 2;
        }
        ml_log_set_level(lv);
        s_level_from_cli = 1;
    }
    if (check) {
        ml_check_t problems;
        ml_check_init(&problems);
        ml_broker_config_check(cfg, &problems);
        ml_broker_config_destroy(&cfg);
        if (problems.n) {
            ml_check_print(&problems, "medlinkd", stderr);
            fprintf(stderr, "medlinkd: %s is not valid (%d problem%s)\n", config, problems.n,
                    problems.n == 1 ? "" : "s");
            return 1;
        }
        printf("medlinkd: %s is valid (%zu nodes)\n", config, n_nodes);
        return 0;
    }
    /* One medlinkd per data_dir: a second one would share broker.db with
     * the first and both would deliver the same queue. The lock is held
     * until the process exits (the descriptor is never closed). */
    int lock_fd = -1;
    if (ml_mkdirs(cfg->data_dir) != 0) {
        fprintf(stderr, "medlinkd: cannot create data_dir %s: %s\n", cfg->data_dir,
                strerror(errno));
        ml_broker_config_destroy(&cfg);
        return 1;
    }
    if (ml_lock_take(cfg->data_dir, "medlinkd.lock", &lock_fd, err, sizeof err) != 0) {
        fprintf(stderr, "medlinkd: %s\n", err);
        ml_log(ML_LOG_ERROR, "broker", "%s", err);
        ml_broker_config_destroy(&cfg);
        return 1;
    }
    /* A peer vanishing mid-write must not kill the daemon. */
    signal(SIGPIPE, SIG_IGN);

    uv_loop_t loop;
    uv_loop_init(&loop);
    /* Signals first, so that a SIGTERM arriving during start-up (store
     * open, queue scan) still ends in a clean shutdown. */
    uv_signal_t sigint, sigterm, sighup;
    uv_signal_init(&loop, &sigint);
    uv_signal_init(&loop, &sigterm);
    uv_signal_init(&loop, &sighup);
    uv_signal_start(&sigint, s_stop_cb, SIGINT);
    uv_signal_start(&sigterm, s_stop_cb, SIGTERM);
    uv_signal_start(&sighup, s_reload_cb, SIGHUP);
    char status[600];
    /* The port file is written at start only (a reload does not move the
     * listening sockets); ml_broker_new takes cfg, so keep its path. */
    char *port_file = cfg->port_file ? strdup(cfg->port_file) : NULL;
    if (cfg->port_file && !port_file) {
        fprintf(stderr, "medlinkd: out of memory\n");
        ml_broker_config_destroy(&cfg);
        return 1;
    }
    if (ml_broker_new(&loop, &cfg, &s_broker, err, sizeof err) != 0) {
        fprintf(stderr, "medlinkd: %s\n", err);
        ml_log(ML_LOG_ERROR, "broker", "cannot start: %s", err);
        free(port_file);
        ml_broker_config_destroy(&cfg);
        uv_walk(&loop, s_close_walk, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        uv_loop_close(&loop);
        return 1;
    }
    /* ml_broker_new has bound the listening socket, opened the store and
     * scanned the queues: peers can be served from now on. The status names
     * the endpoint bound (a port the system picked for port 0). */
    snprintf(status, sizeof status, "listening on %s, %zu node(s) registered",
             ml_broker_endpoint(s_broker), n_nodes);
    if (port_file) {
        /* Before READY=1, so that whoever waits for either finds the ports. */
        if (s_port_file_write(port_file, s_broker) != 0) {
            const char *why = strerror(errno);
            fprintf(stderr, "medlinkd: cannot write port_file %s: %s\n", port_file, why);
            ml_log(ML_LOG_ERROR, "broker", "cannot start: cannot write port_file %s: %s", port_file,
                   why);
            ml_broker_destroy(&s_broker);
            uv_walk(&loop, s_close_walk, NULL);
            uv_run(&loop, UV_RUN_DEFAULT);
            uv_loop_close(&loop);
            free(port_file);
            return 1;
        }
        const char *http = ml_bk_http_address(s_broker);
        ml_log(ML_LOG_INFO, "broker", "port file %s: broker=%s%s%s", port_file,
               ml_broker_endpoint(s_broker), http && *http ? " http=" : "", http ? http : "");
    }
    ml_sdnotify_ready(status);
    ml_sdnotify_watchdog_init(&loop, &s_watchdog);
    uv_run(&loop, UV_RUN_DEFAULT);
    ml_sdnotify_watchdog_close(&s_watchdog);
    ml_broker_destroy(&s_broker);
    /* After a clean stop the ports are no longer ours: a stale file would
     * point a reader at whatever binds them next. */
    if (port_file && unlink(port_file) != 0 && errno != ENOENT)
        ml_log(ML_LOG_WARN, "broker", "cannot remove port_file %s: %s", port_file, strerror(errno));
    free(port_file);
    uv_run(&loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&loop);
    if (rc != 0)
        ml_log(ML_LOG_WARN, "broker", "loop closed with handles still open");
    ml_log(ML_LOG_INFO, "broker", "stopped");
    return 0;
}
