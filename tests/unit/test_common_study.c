/* tests/common/study.[ch], the DICOM files the integration tests drop into
 * spool folders: what they build must read back through the library's own
 * probe (ml_dicom_probe) as the study, series and image they say, and the
 * same index must give the same bytes (tests compare SHA-256 sums of files
 * written on both sides). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_env.h"
#include "ml_imaging.h"
#include "study.h"
#include "support.h"

static const tc_dicom_t s_study = {.study_uid = "1.2.826.0.1.3680043.8.498.3003",
                                   .series_uid = "1.2.826.0.1.3680043.8.498.2002",
                                   .sop_prefix = "1.2.826.0.1.3680043.8.498.10",
                                   .patient = "ZHANG^WEI"};

Test(common_study, file_probes_as_the_image_it_describes)
{
    char dir[256], path[400], sha[65], err[256] = "";
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/IM0007.dcm", dir);
    cr_assert_eq(tc_dicom_write(&s_study, path, 7, 4096, sha), 0, "%s", strerror(errno));
    cr_assert(ml_sha256_hex_valid(sha));
    ml_dicom_info_t info;
    cr_assert_eq(ml_dicom_probe(path, &info, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(info.sop_instance_uid, "1.2.826.0.1.3680043.8.498.100007");
    cr_assert_str_eq(info.series_instance_uid, s_study.series_uid);
    cr_assert_str_eq(info.study_instance_uid, s_study.study_uid);
    cr_assert_str_eq(info.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
    cr_assert_str_eq(info.modality, "CT");
    cr_assert_str_eq(info.transfer_syntax_uid, "1.2.840.10008.1.2.1");
}

Test(common_study, same_index_same_bytes_other_index_other_bytes)
{
    tc_buf_t a = {0}, b = {0}, c = {0};
    cr_assert_eq(tc_dicom_build(&s_study, 1, 10000, &a), 0);
    cr_assert_eq(tc_dicom_build(&s_study, 1, 10000, &b), 0);
    cr_assert_eq(tc_dicom_build(&s_study, 2, 10000, &c), 0);
    cr_assert_eq(a.n, b.n);
    cr_assert_eq(memcmp(a.b, b.b, a.n), 0, "the same image built twice differs");
    cr_assert(a.n != c.n || memcmp(a.b, c.b, a.n) != 0, "two images of the study are equal");
    /* The pixel data is the last element and as long as asked. */
    cr_assert_gt(a.n, 10000 + 132);
    free(a.b);
    free(b.b);
    free(c.b);
    /* A UID past DICOM's 64 characters is refused, not written. */
    tc_dicom_t bad = s_study;
    bad.study_uid = "1.2.826.0.1.3680043.8.498.30031.2.826.0.1.3680043.8.498.300312345678";
    tc_buf_t d = {0};
    cr_assert_eq(tc_dicom_build(&bad, 1, 16, &d), -1);
    free(d.b);
}
