/* medlinkctl top (see top.h). One kept connection (session.h ctl_conn_*)
 * asks for the status every interval; print.c renders each screen into a
 * memory buffer, and this file puts it on the terminal: home, each line cut
 * to the width and cleared to its end, the rest of the screen cleared, so
 * that a refresh never flickers through a blank screen.
 *
 * The terminal: with the keyboard a terminal, it is put in cbreak mode (no
 * echo, no line editing, keys one by one; ISIG kept so that Ctrl-C is still
 * SIGINT) and in the alternate screen with the cursor hidden. Every exit
 * restores it: q, Ctrl-C, SIGTERM and SIGHUP end the loop and reach the one
 * restore at the end; an exit() anywhere else (out of memory) goes through
 * the atexit handler; Ctrl-Z (SIGTSTP) restores it before the process
 * stops and sets top's mode again when it continues. libuv sets O_NONBLOCK on the keyboard's open
 * file, which the shell shares: its flags are put back too. */
#include "top.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "build.h"
#include "ml_common.h"
#include "print.h"
#include "session.h"

/* What the terminal was before top changed it, and what top wants of it
 * (applied again after a suspension). */
static struct {
    int raw;    /* termios changed */
    int screen; /* alternate screen entered */
    int want_raw, want_screen;
    struct termios saved;
    int fl; /* stdin's file status flags, -1 if not saved */
} s_term = {0, 0, 0, 0, {0}, -1};

static void s_term_restore(void)
{
    if (s_term.screen) {
        fputs("\x1b[?25h\x1b[?1049l", stdout);
        fflush(stdout);
        s_term.screen = 0;
    }
    if (s_term.raw) {
        tcsetattr(STDIN_FILENO, TCSAFLUSH, &s_term.saved);
        s_term.raw = 0;
    }
    if (s_term.fl >= 0)
        fcntl(STDIN_FILENO, F_SETFL, s_term.fl);
}

/* cbreak: keys one at a time, no echo; signals from keys kept. Then the
 * alternate screen, cursor hidden. */
static int s_term_apply(void)
{
    if (s_term.want_raw && !s_term.raw) {
        struct termios t = s_term.saved;
        t.c_lflag &= ~(tcflag_t)(ICANON | ECHO);
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        if (tcsetattr(STDIN_FILENO, TCSAFLUSH, &t) < 0)
            return ML_EIO;
        s_term.raw = 1;
    }
    if (s_term.want_screen && !s_term.screen) {
        fputs("\x1b[?1049h\x1b[?25l\x1b[2J", stdout);
        s_term.screen = 1;
    }
    return 0;
}

/* Terminal size, 24 x 80 when unknown. */
static void s_size(int *rows, int *cols)
{
    struct winsize ws;
    *rows = 24;
    *cols = 80;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0) {
        *rows = ws.ws_row;
        *cols = ws.ws_col;
    }
}

/* One screen: banner (a line saying the broker went away, or NULL), then
 * the last snapshot (may be NULL). tty: drawn in place, cut to the
 * terminal; else printed as plain lines, the screens one after another
 * with a blank line between (with a banner, only the banner). */
static void s_draw(int tty, int interval_ms, const char *banner,
                   const Medlink__V1__BrokerStatus *st, const Medlink__V1__BrokerStatus *prev,
                   int64_t elapsed_ms)
{
    char *buf = NULL;
    size_t len = 0;
    int rows = 0, cols = 0;
    FILE *m = open_memstream(&buf, &len);
    if (!m)
        ctl_oom();
    if (tty)
        s_size(&rows, &cols);
    int budget = tty ? rows - 1 : 0; /* the last row: the key help */
    if (banner) {
        fprintf(m, "%s\n", banner);
        budget -= budget > 0;
    }
    /* On a pipe a stale snapshot is not printed again: each one printed
     * is fresh, the banner says when none could be had. */
    if (st && (tty || !banner))
        ctl_print_top(m, st, prev, elapsed_ms, budget > 0 ? budget : (tty ? 1 : 0));
    if (fclose(m) != 0 || !buf)
        ctl_oom();
    if (!tty) {
        fputs(buf, stdout);
        fputs("\n", stdout);
        fflush(stdout);
        free(buf);
        return;
    }
    fputs("\x1b[H", stdout);
    int row = 0;
    for (char *line = buf, *eol; *line && row < rows - 1; line = eol + 1, row++) {
        eol = strchr(line, '\n');
        if (!eol)
            eol = line + strlen(line);
        char keep = *eol;
        *eol = '\0';
        fwrite(line, 1, ctl_text_fit(line, cols), stdout);
        fputs("\x1b[K\r\n", stdout);
        *eol = keep;
        if (!keep)
            break;
    }
    fputs("\x1b[J", stdout);
    char help[80];
    snprintf(help, sizeof help, "q quits; refreshed every %.1f s", interval_ms / 1000.0);
    printf("\x1b[%d;1H%.*s\x1b[K", rows, (int)ctl_text_fit(help, cols), help);
    fflush(stdout);
    free(buf);
}

int ctl_top(const ctl_opts_t *o, ml_tls_ctx_t *tls)
{
    int tty = isatty(STDOUT_FILENO);
    int kbd = tty && isatty(STDIN_FILENO);
    ctl_conn_t *c = NULL;
    ml_envelope_t *cur = NULL, *prev = NULL;
    int64_t cur_at = 0, prev_at = 0;
    int rc = CTL_EXIT_OK, quit = 0, ever = 0;
    long shown = 0;
    Medlink__V1__AdminRequest req;
    if ((rc = ctl_build_admin(o, &req)) != CTL_EXIT_OK)
        return rc;
    /* Before libuv makes the keyboard non-blocking. */
    if (kbd)
        s_term.fl = fcntl(STDIN_FILENO, F_GETFL);
    atexit(s_term_restore);
    if (ctl_conn_open(o, tls, kbd ? STDIN_FILENO : -1, &c) < 0) {
        s_term_restore();
        return CTL_EXIT_FAIL;
    }
    if (kbd && tcgetattr(STDIN_FILENO, &s_term.saved) < 0) {
        rc = ctl_fail(CTL_EXIT_FAIL, "cannot read the terminal's mode: %s", strerror(errno));
        goto out;
    }
    s_term.want_raw = kbd;
    s_term.want_screen = tty;
    if (s_term_apply() < 0) {
        rc = ctl_fail(CTL_EXIT_FAIL, "cannot set the terminal's mode: %s", strerror(errno));
        goto out;
    }
    /* An answer is due within the interval (at least 2 s), or --timeout
     * when that is given; the first connection may take --timeout. */
    int wait_ms =
        o->timeout ? o->timeout_s * 1000 : (o->interval_ms > 2000 ? o->interval_ms : 2000);
    while (!quit) {
        int64_t t0 = ml_mono_ms();
        ml_envelope_t *rep = NULL;
        int r = ctl_conn_admin(c, &req, ever ? wait_ms : o->timeout_s * 1000, &rep);
        if (r == 0 && rep->admin_reply && rep->admin_reply->status == 0 &&
            rep->admin_reply->broker_status) {
            ml_env_free(&prev);
            prev = cur;
            prev_at = cur_at;
            cur = rep;
            cur_at = ml_mono_ms();
            ever = 1;
            s_draw(tty, o->interval_ms, NULL, cur->admin_reply->broker_status,
                   prev ? prev->admin_reply->broker_status : NULL, cur_at - prev_at);
        } else if (r == 0) {
            const char *err = rep->admin_reply && rep->admin_reply->error
                                  ? rep->admin_reply->error
                                  : "the reply has no status";
            s_term_restore();
            rc = ctl_fail(CTL_EXIT_FAIL, "refused: %s", err);
            ml_env_free(&rep);
            goto out;
        } else if (r != CTL_CONN_EVENT) {
            /* Not yet connected, or a refusal retrying will not fix: an
             * error, as any other command. Once it has shown the broker,
             * top stays and says the broker went away until it is back. */
            if (!ever || r == ML_ETLS || r == ML_EDENIED) {
                s_term_restore();
                rc = ctl_fail(r == ML_ETLS ? CTL_EXIT_TLS : CTL_EXIT_FAIL, "%s", ctl_conn_why(c));
                goto out;
            }
            char banner[1400];
            snprintf(banner, sizeof banner, "disconnected, retrying: %s", ctl_conn_why(c));
            ml_env_free(&prev);
            s_draw(tty, o->interval_ms, banner, cur ? cur->admin_reply->broker_status : NULL, NULL,
                   0);
        }
        if (r != CTL_CONN_EVENT && o->count_n && ++shown >= o->count_n)
            break;
        /* Until the next refresh: keys and signals end the wait early. */
        for (;;) {
            int64_t left = o->interval_ms - (ml_mono_ms() - t0);
            if (r != CTL_CONN_EVENT && left <= 0)
                break;
            if (r != CTL_CONN_EVENT && ctl_conn_wait(c, (int)left) == 0)
                break;
            r = 0;
            int key = 0, sig = 0;
            ctl_conn_take_event(c, &key, &sig);
            if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP)
                quit = 1;
            if (key) {
                char k[64];
                ssize_t n = read(STDIN_FILENO, k, sizeof k);
                for (ssize_t i = 0; i < n; i++)
                    if (k[i] == 'q' || k[i] == 'Q' || k[i] == 3 /* ^C without ISIG */)
                        quit = 1;
                if (n == 0)
                    quit = 1; /* the terminal is gone */
            }
            if (sig == SIGTSTP) {
                /* Ctrl-Z: the shell gets its terminal back as it was, and
                 * top its mode when it is resumed (fg). */
                s_term_restore();
                raise(SIGSTOP);
                s_term_apply();
            }
            if (quit || sig == SIGWINCH || sig == SIGTSTP) {
                if (sig != 0 && !quit && cur)
                    s_draw(tty, o->interval_ms, NULL, cur->admin_reply->broker_status,
                           prev ? prev->admin_reply->broker_status : NULL, cur_at - prev_at);
                if (quit)
                    break;
            }
        }
    }
out:
    s_term_restore();
    ml_env_free(&cur);
    ml_env_free(&prev);
    ctl_conn_destroy(&c);
    return rc;
}
