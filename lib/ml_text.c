/* Checks and escaping for text from peers (see ml_text.h). Written without
 * the C library's locale functions (isprint, mbrtowc): their answers depend
 * on the locale a daemon happens to start in, and these checks must not. */
#include "ml_text.h"

#include <stdint.h>
#include <string.h>

size_t ml_utf8_seq_len(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    unsigned c = u[0];
    size_t n;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if ((c & 0xe0) == 0xc0) {
        n = 2;
        cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
        n = 3;
        cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n > len)
        return 0;
    for (size_t k = 1; k < n; k++) {
        if ((u[k] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (u[k] & 0x3f);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return n;
}

int ml_utf8_valid(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        /* Plain ASCII is most of what medlink carries: skip it fast. */
        if ((unsigned char)s[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = ml_utf8_seq_len(s + i, len - i);
        if (n == 0)
            return 0;
        i += n;
    }
    return 1;
}

int ml_text_id_valid(const char *s, size_t max)
{
    if (!s || !*s)
        return 0;
    if (max == 0)
        max = ML_TEXT_ID_MAX;
    size_t n = 0;
    for (const char *p = s; *p; p++, n++) {
        char c = *p;
        if (n >= max)
            return 0;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == ':' || c == '@' || c == '-'))
            return 0;
    }
    return 1;
}

/* 1 if the well-formed sequence s[0..n) must be escaped: a control
 * character, or a code point that moves or reorders what a terminal shows
 * after it (line separators, bidirectional overrides and isolates). */
static int s_is_unsafe(const unsigned char *s, size_t n)
{
    if (n == 1)
        return s[0] < 0x20 || s[0] == 0x7f;
    if (n == 2) /* U+0080-U+009F, the C1 controls (CSI is U+009B) */
        return s[0] == 0xc2 && s[1] >= 0x80 && s[1] <= 0x9f;
    if (n == 3 && s[0] == 0xe2) {
        unsigned cp = ((unsigned)(s[1] & 0x3f) << 6) | (s[2] & 0x3f); /* U+2000 + cp */
        return (cp >= 0x28 && cp <= 0x2e) || (cp >= 0x66 && cp <= 0x69);
    }
    return 0;
}

size_t ml_text_escape(const char *s, size_t len, char *out, size_t outlen)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    if (outlen == 0)
        return 0;
    for (size_t i = 0; i < len;) {
        const unsigned char *u = (const unsigned char *)s + i;
        size_t n = ml_utf8_seq_len(s + i, len - i);
        if (n > 0 && !s_is_unsafe(u, n)) {
            if (o + n >= outlen)
                break;
            memcpy(out + o, u, n);
            o += n;
            i += n;
            continue;
        }
        /* An unsafe character is escaped whole; a byte outside UTF-8 on
         * its own. */
        size_t k = n > 0 ? n : 1;
        if (o + 4 * k >= outlen)
            break;
        for (size_t j = 0; j < k; j++) {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[u[j] >> 4];
            out[o++] = hex[u[j] & 15];
        }
        i += k;
    }
    out[o] = '\0';
    return o;
}

int ml_text_needs_escape(const char *s, size_t len)
{
    for (size_t i = 0; i < len;) {
        size_t n = ml_utf8_seq_len(s + i, len - i);
        if (n == 0 || s_is_unsafe((const unsigned char *)s + i, n))
            return 1;
        i += n;
    }
    return 0;
}
