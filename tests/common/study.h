/* DICOM Part 10 files for tests: what a clinic's modality would write, made
 * in memory (explicit VR little endian, the UIDs medlink reads and
 * pseudo-random pixel data of a chosen size), shared by the unit and
 * integration tests and the benchmarks. No test framework inside: the
 * functions return errors, and abort() only when memory runs out. */
#ifndef ML_TEST_STUDY_H
#define ML_TEST_STUDY_H

#include <stddef.h>
#include <stdint.h>

/* A growing byte buffer; {0} is an empty one. The caller frees b. */
typedef struct {
    uint8_t *b;
    size_t n, cap;
} tc_buf_t;

/* Appends n bytes of p. */
void tc_put(tc_buf_t *b, const void *p, size_t n);
/* Appends one explicit-VR little-endian element: the 12-byte header for
 * OB, OW, OF, SQ, UN and UT, the 8-byte one for the others. */
void tc_el(tc_buf_t *b, uint16_t group, uint16_t elem, const char *vr, const void *v, uint32_t len);
/* The same for a string value, padded to even length as Part 5 wants (a
 * NUL for UI, a space for the others). Strings up to 126 bytes. */
void tc_el_str(tc_buf_t *b, uint16_t group, uint16_t elem, const char *vr, const char *s);

/* What one image of a study says about itself. */
typedef struct {
    const char *study_uid;  /* (0020,000D) */
    const char *series_uid; /* (0020,000E) */
    const char *sop_prefix; /* SOP Instance UID = sop_prefix followed by %04d of index */
    const char *patient;    /* (0010,0010) PN, NULL: none */
    const char *modality;   /* (0008,0060), NULL: "CT" */
} tc_dicom_t;

/* Builds image number index of the study d describes into *out (appended):
 * preamble, "DICM", the file meta group, the identifying elements and
 * (7FE0,0010) with `pixels` bytes seeded by index (the same index and size
 * give the same bytes). Returns 0, or -1 when a UID does not fit. */
int tc_dicom_build(const tc_dicom_t *d, int index, size_t pixels, tc_buf_t *out);
/* tc_dicom_build written to path (created or truncated); sha, when not
 * NULL, gets the file's SHA-256 in hex. Returns 0 or -1 (errno set). */
int tc_dicom_write(const tc_dicom_t *d, const char *path, int index, size_t pixels, char sha[65]);

#endif
