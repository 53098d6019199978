/* Fuzz target: the DICOM Part 10 header probe (lib/ml_imaging.c,
 * ml_dicom_probe_buf), which reads every file a clinic drops into a study
 * folder before anything else looks at it.
 *
 * The input is a file's first bytes. It is probed as a whole file, and as
 * a window of a larger file (the probe reads at most 1 MiB of a file, and
 * a length running past the window must end the walk quietly). Checked:
 * every string the probe returns is terminated inside its field, an
 * accepted file has a SOP Instance UID, a refusal is ML_EINVAL with a
 * sentence, and no probe reads outside its buffer (AddressSanitizer; the
 * buffer is an exact-size copy). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ml_common.h"
#include "ml_imaging.h"

#define S_FAIL(...) ml_fuzz_fail("fuzz_dicom", __VA_ARGS__)

static void s_check(const ml_dicom_info_t *i)
{
#define S_TERM(f)                                                                                  \
    if (memchr(i->f, '\0', sizeof i->f) == NULL)                                                   \
        S_FAIL(#f " is not terminated");
    S_TERM(sop_instance_uid);
    S_TERM(series_instance_uid);
    S_TERM(study_instance_uid);
    S_TERM(sop_class_uid);
    S_TERM(modality);
    S_TERM(transfer_syntax_uid);
#undef S_TERM
}

static void s_probe(const uint8_t *buf, size_t len, uint64_t file_size)
{
    ml_dicom_info_t info;
    char err[256] = "";
    /* An exact-size copy, so a read one past the window is caught. */
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        abort();
    memcpy(copy, buf, len);
    int rc = ml_dicom_probe_buf(copy, len, file_size, &info, err, sizeof err);
    if (rc == 0) {
        s_check(&info);
        if (!info.sop_instance_uid[0])
            S_FAIL("accepted without a SOP Instance UID");
    } else if (rc != ML_EINVAL || !err[0]) {
        S_FAIL("refused with %d and \"%s\"", rc, err);
    }
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ml_fuzz_quiet();
    s_probe(data, size, size);
    /* The same bytes as the first window of a file twice as long, and a
     * window cut short at a point the input picks. */
    s_probe(data, size, (uint64_t)size * 2 + 1);
    if (size > 2) {
        size_t cut = ((size_t)data[size - 1] << 8 | data[size - 2]) % size;
        s_probe(data, cut, size);
    }
    (void)ml_imaging_chunk_count(size, (uint32_t)(size ? data[0] : 0) << 12);
    return 0;
}
