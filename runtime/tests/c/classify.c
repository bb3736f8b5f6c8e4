/* Exercises the C ABI as a camera program would: classify an RGB file (raw bytes from the test),
 * print the top-k like `runtime classify --json` does, then each error path. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "vit_runtime.h"

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, vit_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: classify RAW_RGB WIDTH HEIGHT\n");
        return 2;
    }
    unsigned width = (unsigned)atoi(argv[2]), height = (unsigned)atoi(argv[3]);
    size_t size = (size_t)width * height * 3;
    uint8_t *pixels = malloc(size);
    FILE *file = fopen(argv[1], "rb");
    if (!pixels || !file || fread(pixels, 1, size, file) != size) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    fclose(file);

    VitClassifier *vit = vit_classifier_new(NULL, 3, 1);
    if (!vit) return fail("vit_classifier_new");
    VitPrediction top[3];
    size_t n = 0;
    if (vit_classify(vit, pixels, width, height, (size_t)width * 3, VIT_RGB8, top, 3, &n) != 0)
        return fail("vit_classify");
    for (size_t i = 0; i < n; i++)
        printf("%s %zu %.6f\n", vit_label(vit, top[i].class_index), top[i].class_index,
               top[i].probability);

    /* Error paths: each fails cleanly and says why. */
    if (vit_classifier_new("/nonexistent/model.onnx", 3, 1) != NULL) return 3;
    printf("error: %s\n", vit_last_error());
    if (vit_classify(vit, pixels, width, height, 1, VIT_RGB8, top, 3, &n) != -1) return 3;
    printf("error: %s\n", vit_last_error());
    if (vit_classify(vit, pixels, width, height, (size_t)width * 3, 7, top, 3, &n) != -1) return 3;
    printf("error: %s\n", vit_last_error());
    if (vit_classify(vit, pixels, 0, height, 0, VIT_RGB8, top, 3, &n) != -1) return 3;
    printf("error: %s\n", vit_last_error());
    /* A bottom-up image's negative stride, as size_t. */
    size_t up = (size_t)0 - (size_t)width * 3;
    if (vit_classify(vit, pixels + size - width * 3, width, height, up, VIT_RGB8, top, 3, &n) != -1)
        return 3;
    printf("error: %s\n", vit_last_error());
    VitPrediction *misaligned = (VitPrediction *)((char *)top + 1);
    if (vit_classify(vit, pixels, width, height, (size_t)width * 3, VIT_RGB8, misaligned, 2, &n) != -1)
        return 3;
    printf("error: %s\n", vit_last_error());
    /* "Room for as many as you like": only the top-k are written. */
    if (vit_classify(vit, pixels, width, height, (size_t)width * 3, VIT_RGB8, top, SIZE_MAX, &n) != 0)
        return fail("vit_classify with capacity SIZE_MAX");
    printf("capacity SIZE_MAX: %zu written\n", n);
    printf("classes %zu, label 99 %s\n", vit_class_count(vit),
           vit_label(vit, 99) == NULL ? "NULL" : "set");
    vit_classifier_free(vit);
    vit_classifier_free(NULL);
    free(pixels);
    return 0;
}
