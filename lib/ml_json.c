/* Descriptor-driven protobuf-c <-> JSON mapping (proto3 JSON conventions).
 * Nothing here knows a medlink message type: both directions walk the
 * ProtobufCMessageDescriptor and reach fields through their offsets, so a
 * new field in the .proto files shows up in spool files and medlinkctl
 * --json without a change here. Decoding builds messages whose every
 * pointer comes from malloc, exactly as protobuf_c_message_unpack(..., NULL,
 * ...) would, so one protobuf_c_message_free_unpacked(msg, NULL) frees a
 * decoded message, and also a half-built one when the input turns out to be
 * bad halfway through. */
#include "ml_json.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ml_common.h"
#include "ml_text.h"

/* Nesting limit for both the JSON text and the message tree. medlink's
 * deepest real document is about five levels; the limit only exists so that
 * hostile input cannot make us (or jansson, which recurses up to 2048
 * levels) spend stack on it. */
#define ML_JSON_MAX_DEPTH 64
/* Longest field path kept for error messages; longer paths are cut. */
#define ML_JSON_PATH_MAX 512
/* Longest field name we turn into a JSON name. */
#define ML_JSON_NAME_MAX 128

/* State shared by one encode or decode walk: where the caller wants the
 * error sentence and the path of the field being worked on. */
struct s_walk {
    char *err;
    size_t errlen;
    char path[ML_JSON_PATH_MAX];
    size_t plen;
};

/* Writes "path: message" (or just the message at the root) into the
 * caller's error buffer. Returns ML_EINVAL so callers can `return
 * s_fail(...)`. */
static int s_fail(struct s_walk *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int s_fail(struct s_walk *w, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (w->plen > 0)
        ml_seterr(w->err, w->errlen, "%s: %s", w->path, msg);
    else
        ml_seterr(w->err, w->errlen, "%s", msg);
    return ML_EINVAL;
}

/* Appends ".name" (or "name" at the root) to the path and returns the old
 * length for s_path_pop. A path too long for the buffer is cut, which only
 * shortens error messages. */
static size_t s_path_push(struct s_walk *w, const char *name)
{
    size_t old = w->plen;
    int n = snprintf(w->path + old, sizeof w->path - old, "%s%s", old ? "." : "", name);
    if (n > 0)
        w->plen = old + (size_t)n < sizeof w->path ? old + (size_t)n : sizeof w->path - 1;
    return old;
}

static size_t s_path_push_index(struct s_walk *w, size_t i)
{
    size_t old = w->plen;
    int n = snprintf(w->path + old, sizeof w->path - old, "[%zu]", i);
    if (n > 0)
        w->plen = old + (size_t)n < sizeof w->path ? old + (size_t)n : sizeof w->path - 1;
    return old;
}

static void s_path_pop(struct s_walk *w, size_t old)
{
    w->plen = old;
    w->path[old] = '\0';
}

/* The proto3 JSON name of a field: underscores dropped and the letter after
 * each one upper-cased ("case_id" -> "caseId"), as protoc computes
 * json_name. protobuf-c 1.4 does not keep json_name in its descriptors, so
 * it is derived here each time. */
static void s_json_name(const char *name, char *out, size_t len)
{
    size_t o = 0;
    int upper = 0;
    for (const char *p = name; *p && o + 1 < len; p++) {
        if (*p == '_') {
            upper = 1;
            continue;
        }
        out[o++] = upper && *p >= 'a' && *p <= 'z' ? (char)(*p - 'a' + 'A') : *p;
        upper = 0;
    }
    out[o] = '\0';
}

/* Finds the field a JSON key names: the proto name ("case_id") or the JSON
 * name ("caseId"). O(number of fields). */
static const ProtobufCFieldDescriptor *s_find_field(const ProtobufCMessageDescriptor *desc,
                                                    const char *key)
{
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(desc, key);
    if (f)
        return f;
    char jname[ML_JSON_NAME_MAX];
    for (unsigned i = 0; i < desc->n_fields; i++) {
        s_json_name(desc->fields[i].name, jname, sizeof jname);
        if (strcmp(jname, key) == 0)
            return &desc->fields[i];
    }
    return NULL;
}

static const ProtobufCFieldDescriptor *s_field_by_id(const ProtobufCMessageDescriptor *desc,
                                                     uint32_t id)
{
    for (unsigned i = 0; i < desc->n_fields; i++)
        if (desc->fields[i].id == id)
            return &desc->fields[i];
    return NULL;
}

/* Size of one element of a repeated field of type t, as protobuf-c lays
 * them out (enums and bools are int-sized). */
static size_t s_elem_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        return sizeof(int32_t);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return sizeof(int64_t);
    case PROTOBUF_C_TYPE_FLOAT:
        return sizeof(float);
    case PROTOBUF_C_TYPE_DOUBLE:
        return sizeof(double);
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING:
        return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(ProtobufCMessage *);
    }
    return 0;
}

/* A copy of s[0..len) with every byte that is not part of well-formed
 * UTF-8 replaced by U+FFFD, as a reader would show it. Returns NULL out of
 * memory. O(len). */
static char *s_utf8_replace(const char *s, size_t len)
{
    char *out = malloc(len * 3 + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t n = ml_utf8_seq_len(s + i, len - i);
        if (n == 0) {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
            continue;
        }
        memcpy(out + o, s + i, n);
        o += n;
        i += n;
    }
    out[o] = '\0';
    return out;
}

/* Names the place of byte offset bad in JSON text that is not UTF-8 there:
 * the path of keys and indexes that leads to it ("referral.patient.name",
 * "referral.diagnosis[0].text"), written into path. jansson refuses such
 * text with a byte offset only, and "line 7, column 21" says less to the
 * person who has to fix the file than the field does. Runs after
 * s_check_depth, so the nesting is bounded. O(bad). */
static void s_path_at(const char *s, size_t bad, char *path, size_t cap)
{
    struct {
        char obj;      /* 1: object, 0: array */
        char key[64];  /* object: the key being read or last read */
        size_t index;  /* array: the element being read */
        char want_key; /* object: the next string is a key */
    } st[ML_JSON_MAX_DEPTH + 1];
    int top = -1, in_key = 0;
    size_t klen;
    for (size_t i = 0; i < bad; i++) {
        char c = s[i];
        if (c == '"') {
            /* A string: read to its end, or to the bad byte. */
            in_key = top >= 0 && st[top].obj && st[top].want_key;
            klen = 0;
            for (i++; i < bad && s[i] != '"'; i++) {
                if (s[i] == '\\' && i + 1 < bad)
                    i++;
                if (in_key && klen + 1 < sizeof st[top].key)
                    st[top].key[klen++] = s[i];
            }
            if (in_key) {
                st[top].key[klen] = '\0';
                st[top].want_key = 0;
            }
            if (i >= bad)
                break;
            in_key = 0;
        } else if ((c == '{' || c == '[') && top < ML_JSON_MAX_DEPTH) {
            top++;
            st[top].obj = c == '{';
            st[top].key[0] = '\0';
            st[top].index = 0;
            st[top].want_key = c == '{';
        } else if ((c == '}' || c == ']') && top >= 0) {
            top--;
        } else if (c == ',' && top >= 0) {
            if (st[top].obj)
                st[top].want_key = 1;
            else
                st[top].index++;
        }
    }
    size_t o = 0;
    path[0] = '\0';
    /* Inside a key, the path is its object's. */
    int last = in_key ? top - 1 : top;
    for (int k = 0; k <= last && o + 1 < cap; k++) {
        int n;
        if (st[k].obj && !st[k].key[0])
            break;
        if (st[k].obj)
            n = snprintf(path + o, cap - o, "%s%s", o ? "." : "", st[k].key);
        else
            n = snprintf(path + o, cap - o, "[%zu]", st[k].index);
        if (n < 0)
            break;
        o = o + (size_t)n < cap ? o + (size_t)n : cap - 1;
    }
    if (in_key && o + 1 < cap)
        snprintf(path + o, cap - o, "%s(a field name)", o ? " " : "");
}

/* Offset of the first byte of s[0..len) that is not part of well-formed
 * UTF-8, or len. */
static size_t s_utf8_bad_at(const char *s, size_t len)
{
    for (size_t i = 0; i < len;) {
        size_t n = ml_utf8_seq_len(s + i, len - i);
        if (n == 0)
            return i;
        i += n;
    }
    return len;
}

/* ---- base64 ------------------------------------------------------------ */

static const char s_b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard alphabet with padding, as proto3 JSON prints bytes. */
static char *s_b64_encode(const uint8_t *data, size_t len)
{
    char *out = malloc((len + 2) / 3 * 4 + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)data[i + 1] << 8;
        if (i + 2 < len)
            v |= data[i + 2];
        out[o++] = s_b64[(v >> 18) & 63];
        out[o++] = s_b64[(v >> 12) & 63];
        out[o++] = i + 1 < len ? s_b64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? s_b64[v & 63] : '=';
    }
    out[o] = '\0';
    return out;
}

static int s_b64_value(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+' || c == '-') /* '-' and '_' are the URL-safe alphabet */
        return 62;
    if (c == '/' || c == '_')
        return 63;
    return -1;
}

/* Decodes standard or URL-safe base64, padded or not (proto3 JSON parsers
 * accept both). Returns 0 with a malloc'd *out (NULL when empty),
 * ML_EINVAL or ML_ENOMEM. */
static int s_b64_decode(const char *s, size_t len, uint8_t **out, size_t *outlen)
{
    while (len > 0 && s[len - 1] == '=' && len % 4 != 1)
        len--;
    if (len % 4 == 1)
        return ML_EINVAL;
    *out = NULL;
    *outlen = 0;
    if (len == 0)
        return 0;
    uint8_t *buf = malloc(len / 4 * 3 + 3);
    if (!buf)
        return ML_ENOMEM;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = s_b64_value(s[i]);
        if (v < 0) {
            free(buf);
            return ML_EINVAL;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf[o++] = (uint8_t)(acc >> bits);
        }
    }
    *out = buf;
    *outlen = o;
    return 0;
}

/* ---- encoding ---------------------------------------------------------- */

static int s_encode_message(struct s_walk *w, const ProtobufCMessage *msg, int flags, int depth,
                            json_t **out);

/* 1 when a field without explicit presence holds its zero value, which
 * proto3 JSON leaves out. */
static int s_is_zero(const ProtobufCFieldDescriptor *f, const void *member)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        return *(const int32_t *)member == 0;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return *(const int64_t *)member == 0;
    case PROTOBUF_C_TYPE_FLOAT:
        return *(const float *)member == 0;
    case PROTOBUF_C_TYPE_DOUBLE:
        return *(const double *)member == 0;
    case PROTOBUF_C_TYPE_BOOL:
        return !*(const protobuf_c_boolean *)member;
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)member;
        return !s || !*s;
    }
    case PROTOBUF_C_TYPE_BYTES:
        return ((const ProtobufCBinaryData *)member)->len == 0;
    case PROTOBUF_C_TYPE_MESSAGE:
        return *(ProtobufCMessage *const *)member == NULL;
    }
    return 1;
}

/* Whether a singular field is printed. Fields with presence (oneof
 * members, proto2/proto3 `optional`, messages) print when set, whatever
 * the value; the others print when non-zero, or always with
 * ML_JSON_EMIT_DEFAULTS. */
static int s_is_printed(const ProtobufCFieldDescriptor *f, const ProtobufCMessage *msg, int flags)
{
    const char *base = (const char *)msg;
    const void *member = base + f->offset;
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
        return *(const uint32_t *)(base + f->quantifier_offset) == f->id;
    if (f->type == PROTOBUF_C_TYPE_MESSAGE)
        return *(ProtobufCMessage *const *)member != NULL;
    if (f->label == PROTOBUF_C_LABEL_REQUIRED)
        return 1;
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL) {
        if (f->type == PROTOBUF_C_TYPE_STRING) {
            const char *s = *(char *const *)member;
            return s && s != f->default_value;
        }
        return *(const protobuf_c_boolean *)(base + f->quantifier_offset) != 0;
    }
    return (flags & ML_JSON_EMIT_DEFAULTS) || !s_is_zero(f, member);
}

/* NaN and the infinities are not JSON numbers; proto3 JSON spells them as
 * strings. */
static json_t *s_encode_double(double d)
{
    if (isnan(d))
        return json_string("NaN");
    if (isinf(d))
        return json_string(d > 0 ? "Infinity" : "-Infinity");
    return json_real(d);
}

/* Renders one value (a singular field, or one element of a repeated one)
 * at member. */
static int s_encode_value(struct s_walk *w, const ProtobufCFieldDescriptor *f, const void *member,
                          int flags, int depth, json_t **out)
{
    char buf[32];
    json_t *j = NULL;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        j = json_integer(*(const int32_t *)member);
        break;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        j = json_integer(*(const uint32_t *)member);
        break;
    /* 64-bit integers are strings so that JavaScript readers, whose numbers
     * are doubles, do not silently round them. */
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        snprintf(buf, sizeof buf, "%" PRId64, *(const int64_t *)member);
        j = json_string(buf);
        break;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        snprintf(buf, sizeof buf, "%" PRIu64, *(const uint64_t *)member);
        j = json_string(buf);
        break;
    case PROTOBUF_C_TYPE_FLOAT:
        j = s_encode_double(*(const float *)member);
        break;
    case PROTOBUF_C_TYPE_DOUBLE:
        j = s_encode_double(*(const double *)member);
        break;
    case PROTOBUF_C_TYPE_BOOL:
        j = json_boolean(*(const protobuf_c_boolean *)member);
        break;
    case PROTOBUF_C_TYPE_ENUM: {
        int32_t v = *(const int32_t *)member;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        /* A value this build does not know (from a newer peer) prints as
         * its number, as proto3 JSON says. */
        j = ev ? json_string(ev->name) : json_integer(v);
        break;
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)member;
        if (!s)
            s = "";
        size_t n = strlen(s);
        if (!ml_utf8_valid(s, n)) {
            if (!(flags & ML_JSON_REPLACE_INVALID))
                return s_fail(w, "string is not valid UTF-8");
            char *fixed = s_utf8_replace(s, n);
            if (!fixed)
                return ML_ENOMEM;
            j = json_string(fixed);
            free(fixed);
            break;
        }
        j = json_stringn(s, n);
        break;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *b = member;
        char *s = s_b64_encode(b->data, b->len);
        if (!s)
            return ML_ENOMEM;
        j = json_string(s);
        free(s);
        break;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = *(ProtobufCMessage *const *)member;
        if (!sub)
            return s_fail(w, "message pointer is NULL");
        return s_encode_message(w, sub, flags, depth + 1, out);
    }
    }
    if (!j)
        return ML_ENOMEM;
    *out = j;
    return 0;
}

static int s_encode_repeated(struct s_walk *w, const ProtobufCFieldDescriptor *f,
                             const ProtobufCMessage *msg, int flags, int depth, json_t **out)
{
    const char *base = (const char *)msg;
    size_t n = *(const size_t *)(base + f->quantifier_offset);
    const char *arr = *(char *const *)(base + f->offset);
    size_t size = s_elem_size(f->type);
    int rc = 0;
    json_t *ja = json_array();
    if (!ja)
        return ML_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        size_t old = s_path_push_index(w, i);
        json_t *j = NULL;
        rc = s_encode_value(w, f, arr + i * size, flags, depth, &j);
        s_path_pop(w, old);
        if (rc < 0)
            goto out;
        if (json_array_append_new(ja, j) < 0) {
            rc = ML_ENOMEM;
            goto out;
        }
    }
    *out = ja;
    ja = NULL;
out:
    json_decref(ja);
    return rc;
}

/* Renders msg as a JSON object, fields in descriptor (field number) order.
 * O(size of the message tree). */
static int s_encode_message(struct s_walk *w, const ProtobufCMessage *msg, int flags, int depth,
                            json_t **out)
{
    const ProtobufCMessageDescriptor *desc = msg->descriptor;
    char jname[ML_JSON_NAME_MAX];
    int rc = 0;
    if (depth > ML_JSON_MAX_DEPTH)
        return s_fail(w, "message nesting deeper than %d levels", ML_JSON_MAX_DEPTH);
    json_t *obj = json_object();
    if (!obj)
        return ML_ENOMEM;
    for (unsigned i = 0; i < desc->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &desc->fields[i];
        json_t *j = NULL;
        s_json_name(f->name, jname, sizeof jname);
        size_t old = s_path_push(w, jname);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)((const char *)msg + f->quantifier_offset);
            if (n > 0 || (flags & ML_JSON_EMIT_DEFAULTS))
                rc = s_encode_repeated(w, f, msg, flags, depth, &j);
        } else if (s_is_printed(f, msg, flags)) {
            rc = s_encode_value(w, f, (const char *)msg + f->offset, flags, depth, &j);
        }
        s_path_pop(w, old);
        if (rc < 0)
            goto out;
        if (j && json_object_set_new(obj, jname, j) < 0) {
            rc = ML_ENOMEM;
            goto out;
        }
    }
    *out = obj;
    obj = NULL;
out:
    json_decref(obj);
    return rc;
}

int ml_json_encode(const ProtobufCMessage *msg, int flags, char **out, char *err, size_t errlen)
{
    struct s_walk w = {.err = err, .errlen = errlen};
    json_t *root = NULL;
    int rc;
    if (!msg || !msg->descriptor || !out) {
        ml_seterr(err, errlen, "no message to encode");
        return ML_EINVAL;
    }
    rc = s_encode_message(&w, msg, flags, 1, &root);
    if (rc < 0) {
        if (rc == ML_ENOMEM)
            ml_seterr(err, errlen, "out of memory");
        goto out;
    }
    size_t dflags = (flags & ML_JSON_PRETTY) ? JSON_INDENT(2) : JSON_COMPACT;
    char *text = json_dumps(root, dflags);
    if (!text) {
        ml_seterr(err, errlen, "out of memory");
        rc = ML_ENOMEM;
        goto out;
    }
    *out = text;
out:
    json_decref(root);
    return rc;
}

/* ---- decoding ---------------------------------------------------------- */

static int s_decode_message(struct s_walk *w, const ProtobufCMessageDescriptor *desc, json_t *obj,
                            ProtobufCMessage *msg, int depth);

static const char *s_json_type_name(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "something else";
}

/* An enum value this build does not know. The value is not quoted (a
 * refusal reaches logs, and a value in the wrong field may be a patient's
 * data); the names it may take are. */
static int s_fail_enum(struct s_walk *w, const ProtobufCEnumDescriptor *ed)
{
    char names[192];
    size_t o = 0;
    names[0] = '\0';
    for (unsigned i = 0; i < ed->n_values && o + 1 < sizeof names; i++) {
        int n = snprintf(names + o, sizeof names - o, "%s%s", i ? ", " : "", ed->values[i].name);
        if (n < 0 || (size_t)n >= sizeof names - o) {
            snprintf(names + o, sizeof names - o, "%s", ", ...");
            break;
        }
        o += (size_t)n;
    }
    return s_fail(w, "unknown enum value (expected one of %s)", names);
}

/* Reads a signed integer from a JSON integer, an integral real ("1e3") or
 * a decimal string ("-42", how 64-bit values are written), and checks it
 * against [min, max]. */
static int s_get_signed(struct s_walk *w, json_t *j, int64_t min, int64_t max, const char *tname,
                        int64_t *out)
{
    int64_t v;
    if (json_is_integer(j)) {
        v = json_integer_value(j);
    } else if (json_is_real(j)) {
        double d = json_real_value(j);
        /* 9223372036854775808.0 is the first double past INT64_MAX. */
        if (d != floor(d) || d < -9223372036854775808.0 || d >= 9223372036854775808.0)
            return s_fail(w, "the number is out of range for %s", tname);
        v = (int64_t)d;
    } else if (json_is_string(j)) {
        const char *s = json_string_value(j);
        char *end;
        errno = 0;
        long long ll = strtoll(s, &end, 10);
        /* strtoll skips leading blanks and accepts '+'; JSON does not. */
        if (!*s || end == s || *end || s[0] == ' ' || s[0] == '+' || (s[0] < '0' && s[0] != '-') ||
            s[0] > '9')
            return s_fail(w, "the string is not an integer");
        if (errno == ERANGE)
            return s_fail(w, "the number is out of range for %s", tname);
        v = ll;
    } else {
        return s_fail(w, "expected an integer, got %s", s_json_type_name(j));
    }
    if (v < min || v > max)
        return s_fail(w, "the number is out of range for %s", tname);
    *out = v;
    return 0;
}

static int s_get_unsigned(struct s_walk *w, json_t *j, uint64_t max, const char *tname,
                          uint64_t *out)
{
    uint64_t v;
    if (json_is_integer(j)) {
        json_int_t i = json_integer_value(j);
        if (i < 0)
            return s_fail(w, "the number is out of range for %s", tname);
        v = (uint64_t)i;
    } else if (json_is_real(j)) {
        double d = json_real_value(j);
        if (d != floor(d) || d < 0 || d >= 18446744073709551616.0)
            return s_fail(w, "the number is out of range for %s", tname);
        v = (uint64_t)d;
    } else if (json_is_string(j)) {
        const char *s = json_string_value(j);
        char *end;
        /* strtoull would turn "-1" into UINT64_MAX, so digits only. */
        if (!(s[0] >= '0' && s[0] <= '9')) {
            if (s[0] == '-' && s[1] >= '0' && s[1] <= '9')
                return s_fail(w, "the number is out of range for %s", tname);
            return s_fail(w, "the string is not an integer");
        }
        errno = 0;
        unsigned long long ull = strtoull(s, &end, 10);
        if (*end)
            return s_fail(w, "the string is not an integer");
        if (errno == ERANGE)
            return s_fail(w, "the number is out of range for %s", tname);
        v = ull;
    } else {
        return s_fail(w, "expected an integer, got %s", s_json_type_name(j));
    }
    if (v > max)
        return s_fail(w, "the number is out of range for %s", tname);
    *out = v;
    return 0;
}

static int s_get_double(struct s_walk *w, json_t *j, double *out)
{
    if (json_is_number(j)) {
        *out = json_number_value(j);
        return 0;
    }
    if (json_is_string(j)) {
        const char *s = json_string_value(j);
        char *end;
        if (strcmp(s, "NaN") == 0) {
            *out = NAN;
            return 0;
        }
        if (strcmp(s, "Infinity") == 0) {
            *out = INFINITY;
            return 0;
        }
        if (strcmp(s, "-Infinity") == 0) {
            *out = -INFINITY;
            return 0;
        }
        /* strtod would also take "inf", "nan" and hex; only plain decimal
         * numbers are JSON. */
        if (!*s || strpbrk(s, "xXiInN ") || *s == '+')
            return s_fail(w, "the string is not a number");
        errno = 0;
        double d = strtod(s, &end);
        if (*end || end == s)
            return s_fail(w, "the string is not a number");
        if (errno == ERANGE && isinf(d))
            return s_fail(w, "the number is out of range for double");
        *out = d;
        return 0;
    }
    return s_fail(w, "expected a number, got %s", s_json_type_name(j));
}

static ProtobufCMessage *s_message_new(const ProtobufCMessageDescriptor *desc)
{
    ProtobufCMessage *m = malloc(desc->sizeof_message);
    if (m)
        desc->message_init(m);
    return m;
}

/* Decodes one value into member (a singular field, or one element of a
 * repeated one). member is written only on success, except for messages:
 * a sub-message is hooked in before it is filled so that a failure inside
 * it is freed along with the root. */
static int s_decode_value(struct s_walk *w, const ProtobufCFieldDescriptor *f, json_t *j,
                          void *member, int depth)
{
    int64_t sv;
    uint64_t uv;
    double d;
    int rc;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        if ((rc = s_get_signed(w, j, INT32_MIN, INT32_MAX, "int32", &sv)) < 0)
            return rc;
        *(int32_t *)member = (int32_t)sv;
        return 0;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        if ((rc = s_get_unsigned(w, j, UINT32_MAX, "uint32", &uv)) < 0)
            return rc;
        *(uint32_t *)member = (uint32_t)uv;
        return 0;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        if ((rc = s_get_signed(w, j, INT64_MIN, INT64_MAX, "int64", &sv)) < 0)
            return rc;
        *(int64_t *)member = sv;
        return 0;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        if ((rc = s_get_unsigned(w, j, UINT64_MAX, "uint64", &uv)) < 0)
            return rc;
        *(uint64_t *)member = uv;
        return 0;
    case PROTOBUF_C_TYPE_FLOAT:
        if ((rc = s_get_double(w, j, &d)) < 0)
            return rc;
        if (isfinite(d) && fabs(d) > FLT_MAX)
            return s_fail(w, "the number is out of range for float");
        *(float *)member = (float)d;
        return 0;
    case PROTOBUF_C_TYPE_DOUBLE:
        if ((rc = s_get_double(w, j, &d)) < 0)
            return rc;
        *(double *)member = d;
        return 0;
    case PROTOBUF_C_TYPE_BOOL:
        if (!json_is_boolean(j))
            return s_fail(w, "expected true or false, got %s", s_json_type_name(j));
        *(protobuf_c_boolean *)member = json_is_true(j);
        return 0;
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumDescriptor *ed = f->descriptor;
        const ProtobufCEnumValue *ev;
        if (json_is_string(j)) {
            ev = protobuf_c_enum_descriptor_get_value_by_name(ed, json_string_value(j));
            if (!ev)
                return s_fail_enum(w, ed);
        } else if (json_is_integer(j)) {
            json_int_t v = json_integer_value(j);
            /* Unlike proto3 binary, numbers this build does not know are
             * refused: a JSON document is written by hand or by us, and a
             * value we cannot name is a mistake either way. */
            ev = v >= INT32_MIN && v <= INT32_MAX ? protobuf_c_enum_descriptor_get_value(ed, (int)v)
                                                  : NULL;
            if (!ev)
                return s_fail_enum(w, ed);
        } else {
            return s_fail(w, "expected an enum name, got %s", s_json_type_name(j));
        }
        *(int32_t *)member = ev->value;
        return 0;
    }
    case PROTOBUF_C_TYPE_STRING: {
        if (!json_is_string(j))
            return s_fail(w, "expected a string, got %s", s_json_type_name(j));
        char *s = strdup(json_string_value(j));
        if (!s)
            return ML_ENOMEM;
        *(char **)member = s;
        return 0;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        if (!json_is_string(j))
            return s_fail(w, "expected a base64 string, got %s", s_json_type_name(j));
        ProtobufCBinaryData *b = member;
        uint8_t *data;
        size_t n;
        rc = s_b64_decode(json_string_value(j), json_string_length(j), &data, &n);
        if (rc == ML_EINVAL)
            return s_fail(w, "invalid base64");
        if (rc < 0)
            return rc;
        b->data = data;
        b->len = n;
        return 0;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessageDescriptor *sd = f->descriptor;
        if (!json_is_object(j))
            return s_fail(w, "expected an object, got %s", s_json_type_name(j));
        ProtobufCMessage *sub = s_message_new(sd);
        if (!sub)
            return ML_ENOMEM;
        *(ProtobufCMessage **)member = sub;
        return s_decode_message(w, sd, j, sub, depth + 1);
    }
    }
    return s_fail(w, "unsupported field type %d", (int)f->type);
}

/* Fills a repeated field from a JSON array. The element array is zeroed
 * and the count only grows past an element once it is whole, so a failure
 * leaves something protobuf_c_message_free_unpacked frees correctly. */
static int s_decode_repeated(struct s_walk *w, const ProtobufCFieldDescriptor *f, json_t *ja,
                             ProtobufCMessage *msg, int depth)
{
    char *base = (char *)msg;
    size_t *count = (size_t *)(base + f->quantifier_offset);
    size_t size = s_elem_size(f->type);
    if (!json_is_array(ja))
        return s_fail(w, "expected an array, got %s", s_json_type_name(ja));
    size_t n = json_array_size(ja);
    if (n == 0)
        return 0;
    char *arr = calloc(n, size);
    if (!arr)
        return ML_ENOMEM;
    *(char **)(base + f->offset) = arr;
    *count = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *j = json_array_get(ja, i);
        size_t old = s_path_push_index(w, i);
        int rc;
        if (json_is_null(j)) {
            rc = s_fail(w, "null is not allowed in a list");
        } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            /* Count the sub-message in before filling it (see
             * s_decode_value). */
            const ProtobufCMessageDescriptor *sd = f->descriptor;
            if (!json_is_object(j)) {
                rc = s_fail(w, "expected an object, got %s", s_json_type_name(j));
            } else if (!(((ProtobufCMessage **)arr)[i] = s_message_new(sd))) {
                rc = ML_ENOMEM;
            } else {
                (*count)++;
                rc = s_decode_message(w, sd, j, ((ProtobufCMessage **)arr)[i], depth + 1);
            }
        } else {
            rc = s_decode_value(w, f, j, arr + i * size, depth);
            if (rc == 0)
                (*count)++;
        }
        s_path_pop(w, old);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Fills msg (already initialised) from a JSON object. O(keys x fields) for
 * keys given in camelCase, which is small for real messages. */
static int s_decode_message(struct s_walk *w, const ProtobufCMessageDescriptor *desc, json_t *obj,
                            ProtobufCMessage *msg, int depth)
{
    char *base = (char *)msg;
    const char *key;
    json_t *val;
    int rc = 0;
    if (depth > ML_JSON_MAX_DEPTH)
        return s_fail(w, "nesting deeper than %d levels", ML_JSON_MAX_DEPTH);
    /* One flag per field, to catch a field given under both its names. */
    unsigned char *seen = calloc(desc->n_fields ? desc->n_fields : 1, 1);
    if (!seen)
        return ML_ENOMEM;
    json_object_foreach(obj, key, val)
    {
        const ProtobufCFieldDescriptor *f = s_find_field(desc, key);
        size_t old = s_path_push(w, key);
        if (!f) {
            rc = s_fail(w, "unknown field");
        } else if (seen[f - desc->fields]) {
            rc = s_fail(w, "field given twice (as \"%s\" and under its other name)", key);
        } else if (json_is_null(val)) {
            /* proto3 JSON: null means "the default", i.e. leave it unset. */
            seen[f - desc->fields] = 1;
        } else if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            seen[f - desc->fields] = 1;
            rc = s_decode_repeated(w, f, val, msg, depth);
        } else {
            seen[f - desc->fields] = 1;
            uint32_t *qcase = (uint32_t *)(base + f->quantifier_offset);
            if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) && *qcase != 0 && *qcase != f->id) {
                const ProtobufCFieldDescriptor *other = s_field_by_id(desc, *qcase);
                char oname[ML_JSON_NAME_MAX];
                s_json_name(other ? other->name : "?", oname, sizeof oname);
                rc = s_fail(w, "only one member of a oneof may be set, and %s already is", oname);
            } else if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
                /* The union member is only owned once the case names it; for
                 * a message, s_decode_value hooks it in before filling it,
                 * so the case must be set first for a failure to free it. */
                if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                    *(ProtobufCMessage **)(base + f->offset) = NULL;
                    *qcase = f->id;
                    rc = s_decode_value(w, f, val, base + f->offset, depth);
                    if (rc < 0 && !*(ProtobufCMessage **)(base + f->offset))
                        *qcase = 0;
                } else {
                    rc = s_decode_value(w, f, val, base + f->offset, depth);
                    if (rc == 0)
                        *qcase = f->id;
                }
            } else {
                rc = s_decode_value(w, f, val, base + f->offset, depth);
                if (rc == 0 && f->label == PROTOBUF_C_LABEL_OPTIONAL &&
                    f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
                    *(protobuf_c_boolean *)(base + f->quantifier_offset) = 1;
            }
        }
        s_path_pop(w, old);
        if (rc < 0)
            goto out;
    }
out:
    free(seen);
    return rc;
}

/* Refuses text nested deeper than ML_JSON_MAX_DEPTH before jansson, which
 * parses recursively, sees it. O(len). */
static int s_check_depth(const char *s, size_t len, char *err, size_t errlen)
{
    int depth = 0, in_str = 0;
    size_t line = 1, col = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        col++;
        if (c == '\n') {
            line++;
            col = 0;
        }
        if (in_str) {
            if (c == '\\') {
                /* Skip the escaped character, which may be a quote. */
                i++;
                col++;
            } else if (c == '"') {
                in_str = 0;
            }
        } else if (c == '"') {
            in_str = 1;
        } else if (c == '{' || c == '[') {
            if (++depth > ML_JSON_MAX_DEPTH) {
                ml_seterr(err, errlen, "line %zu, column %zu: nesting deeper than %d levels", line,
                          col, ML_JSON_MAX_DEPTH);
                return ML_EINVAL;
            }
        } else if (c == '}' || c == ']') {
            depth--;
        }
    }
    return 0;
}

int ml_json_decode(const ProtobufCMessageDescriptor *desc, const char *json, size_t len,
                   ProtobufCMessage **out, char *err, size_t errlen)
{
    struct s_walk w = {.err = err, .errlen = errlen};
    json_error_t jerr;
    json_t *root = NULL;
    ProtobufCMessage *msg = NULL;
    int rc;
    if (!desc || (!json && len > 0) || !out) {
        ml_seterr(err, errlen, "bad arguments");
        return ML_EINVAL;
    }
    if ((rc = s_check_depth(json, len, err, errlen)) < 0)
        return rc;
    size_t bad = json ? s_utf8_bad_at(json, len) : len;
    if (bad < len) {
        char where[ML_JSON_PATH_MAX];
        size_t line = 1, col = 1;
        for (size_t i = 0; i < bad; i++, col++)
            if (json[i] == '\n') {
                line++;
                col = 0;
            }
        s_path_at(json, bad, where, sizeof where);
        ml_seterr(err, errlen,
                  "%s%sis not valid UTF-8 text (byte 0x%02x at line %zu, column %zu): the file "
                  "must be saved as UTF-8",
                  where, where[0] ? " " : "", (unsigned char)json[bad], line, col);
        return ML_EINVAL;
    }
    /* Duplicate keys are refused rather than letting the last one win
     * silently. NUL inside strings stays refused (jansson's default) since
     * protobuf-c strings are C strings. */
    root = json_loadb(json ? json : "", len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        /* jansson ends most of its sentences with the text it stopped at
         * ("... near 'Wang Jianguo'"), which may be a patient's data and
         * would reach the agent's log: cut it, line and column say where. */
        char *near = strstr(jerr.text, " near ");
        if (near)
            *near = '\0';
        ml_seterr(err, errlen, "malformed JSON at line %d, column %d: %s", jerr.line, jerr.column,
                  jerr.text);
        return ML_EINVAL;
    }
    if (!json_is_object(root)) {
        ml_seterr(err, errlen, "expected a JSON object for %s, got %s", desc->name,
                  s_json_type_name(root));
        rc = ML_EINVAL;
        goto out;
    }
    msg = s_message_new(desc);
    if (!msg) {
        rc = ML_ENOMEM;
        goto out;
    }
    rc = s_decode_message(&w, desc, root, msg, 1);
    if (rc < 0)
        goto out;
    *out = msg;
    msg = NULL;
out:
    if (rc == ML_ENOMEM)
        ml_seterr(err, errlen, "out of memory");
    if (msg)
        protobuf_c_message_free_unpacked(msg, NULL);
    json_decref(root);
    return rc;
}
