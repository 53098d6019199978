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

#endif
