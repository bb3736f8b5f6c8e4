/* vit_runtime.h: the C ABI of the edge ViT runtime (libruntime.so / libruntime.a).
 *
 * A classifier handle wraps one loaded, optimised model and its reused buffers: create it once,
 * call vit_classify for every frame (no allocation per frame), free it at the end. A handle is
 * used by one thread at a time. Functions that can fail return NULL or -1; vit_last_error()
 * then says why, for the calling thread. */
#ifndef VIT_RUNTIME_H
#define VIT_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct VitClassifier VitClassifier;

typedef struct {
    size_t class_index;
    float probability;
} VitPrediction;

/* Pixel formats of vit_classify: packed 8-bit grey, RGB or BGR (OpenCV's default). */
#define VIT_GRAY8 0
#define VIT_RGB8 1
#define VIT_BGR8 2

/* Load an ONNX model carrying vit.* metadata (model_path NULL: the model embedded in the
 * library). top_k: predictions per frame, 1..16. threads: cores for matrix products (0 one
 * per physical core, 1 the calling thread; process-wide; a library built without the
 * `threads` feature takes 0 or 1). NULL on failure. */
VitClassifier *vit_classifier_new(const char *model_path, size_t top_k, size_t threads);

/* Classify a width x height frame whose rows are stride bytes apart; pixels holds
 * stride * (height - 1) bytes plus one row, read at increasing addresses: a bottom-up buffer's
 * negative stride (a huge size_t) fails cleanly instead of being trusted. Writes up to
 * capacity predictions (at most top_k), best first, to out and their number to *written.
 * 0 on success, -1 on failure (vit_last_error says why). */
int vit_classify(VitClassifier *classifier, const uint8_t *pixels, uint32_t width,
                 uint32_t height, size_t stride, int format, VitPrediction *out,
                 size_t capacity, size_t *written);

/* Number of classes; 0 for NULL. */
size_t vit_class_count(const VitClassifier *classifier);

/* Class name, valid until vit_classifier_free; NULL when out of range. */
const char *vit_label(const VitClassifier *classifier, size_t class_index);

/* Why the last failing call on this thread failed; valid until the next failure on it. */
const char *vit_last_error(void);

/* Free a classifier; NULL is ignored. */
void vit_classifier_free(VitClassifier *classifier);

#ifdef __cplusplus
}
#endif

#endif /* VIT_RUNTIME_H */
