/* INI configuration files (parsed by libinih) held as an ordered list of
 * (section, key, value) entries. Sections may repeat a prefix with a name,
 * e.g. [node county.zhaozhou.hospital]; ml_ini_sections() walks them. */
#ifndef ML_INI_H
#define ML_INI_H

#include <stddef.h>

typedef struct ml_ini ml_ini_t;

/* Loads path. Returns 0, or ML_ECONFIG with err naming the file and line. */
int ml_ini_load(const char *path, ml_ini_t **out, char *err, size_t errlen);
void ml_ini_destroy(ml_ini_t **self_p);

/* The value of key in section, or def when absent (borrowed). */
const char *ml_ini_get(const ml_ini_t *ini, const char *section, const char *key, const char *def);
/* Integer value with range check. Returns 0 (with *out = def when absent) or
 * ML_ECONFIG with err naming section, key and value. */
int ml_ini_get_long(const ml_ini_t *ini, const char *section, const char *key, long def, long min,
                    long max, long *out, char *err, size_t errlen);

/* Calls cb once for each distinct section whose name starts with prefix
 * followed by a space, passing the rest of the name (e.g. prefix "node" and
 * section "node a.b" gives "a.b"). Stops early if cb returns non-zero and
 * returns that value; else 0. */
int ml_ini_sections(const ml_ini_t *ini, const char *prefix,
                    int (*cb)(const ml_ini_t *ini, const char *section, const char *name,
                              void *arg),
                    void *arg);

/* Calls cb for every key in section, in file order (a repeated key is
 * passed each time). Stops early if cb returns non-zero and returns that
 * value; else 0. */
int ml_ini_keys(const ml_ini_t *ini, const char *section,
                int (*cb)(const char *key, const char *value, void *arg), void *arg);

/* The folder of the loaded file (for resolving relative paths), borrowed. */
const char *ml_ini_dir(const ml_ini_t *ini);
/* The path the file was loaded from, as given to ml_ini_load (borrowed). */
const char *ml_ini_path(const ml_ini_t *ini);
/* The line of the entry ml_ini_get would return for section/key, or 0 when
 * the key is absent; for "FILE:LINE:" in a loader's own messages. */
int ml_ini_line(const ml_ini_t *ini, const char *section, const char *key);

/* Strict configuration: each program declares, in one table next to the
 * code that reads them, the sections and keys it knows. A row is
 *   {"broker", "listen"}   the key listen of section [broker]
 *   {"node *", "role"}     the key role of every section [node NAME]
 *   {"acl *", "*"}         any key of every [acl NAME] (its parser checks
 *                          the keys itself, e.g. message kinds)
 * and the table ends with {NULL, NULL}. Adding a key to a program is one
 * row in its table. */
typedef struct {
    const char *section;
    const char *key;
} ml_ini_key_t;

/* Checks every section header and key of ini against schema, so that a
 * misspelt key or section is an error instead of a default silently kept.
 * Returns 0, or ML_ECONFIG with err holding one line per problem, in file
 * order, separated by '\n':
 *   FILE:LINE: [brokr]: unknown section (expected [broker], [node NAME])
 *   FILE:LINE: [agent] scan_msec: unknown key
 *   FILE:LINE: scan_ms: key outside any section (expected [agent] first)
 * When err is too small the last line says how many problems were left
 * out. O(entries x rows). */
int ml_ini_check(const ml_ini_t *ini, const ml_ini_key_t *schema, char *err, size_t errlen);

#endif
