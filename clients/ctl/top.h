/* medlinkctl top: a compact live view of the broker for ops staff, asked
 * for again every --interval (default 1 s) over one kept session, until q,
 * Ctrl-C (SIGINT), SIGTERM or SIGHUP. On a terminal it redraws in place,
 * sized to the terminal, with the keyboard in cbreak mode (restored on
 * every way out); with stdout not a terminal it prints one plain snapshot
 * per interval, with no escape codes, and --count N stops after N. When
 * the broker goes away after the first screen, top says "disconnected,
 * retrying" and carries on until it is back; a broker never reached, or a
 * refusal (TLS, not an OPS node), ends it with the reason. */
#ifndef CTL_TOP_H
#define CTL_TOP_H

#include "cli.h"
#include "ml_tls.h"

/* Runs top. Returns the exit code: CTL_EXIT_OK when quit (q, a signal,
 * --count reached), else CTL_EXIT_FAIL / CTL_EXIT_TLS after saying why on
 * stderr (with the terminal restored first). */
int ctl_top(const ctl_opts_t *o, ml_tls_ctx_t *tls);

#endif
