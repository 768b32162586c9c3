// omr_prof.c: a kernel-level profile of any CUDA process, for GPU nodes without Nsight.
// Loaded by the CUDA driver through CUDA_INJECTION64_PATH (the driver calls
// InitializeInjection when the process first initialises CUDA); records every kernel,
// memcpy, memset and driver API call through CUPTI's activity API and, at exit, writes to
// $OMR_PROF_OUT (default omr-prof.txt) a table per kernel name (calls, total ms, mean us,
// share of GPU time), memcpy/memset totals, the driver calls that cost the host most, and
// GPU busy time next to the span of the run (an idle GPU means the host is the bottleneck).
// Build with scripts/cuda/prof/build.sh; run with scripts/cuda/prof/run.sh.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#define BUF_SIZE (8 << 20)
#define MAX_NAMES 4096

typedef struct {
  char *name;
  uint64_t calls, ns, uploads;
} Row;

static Row kernels[MAX_NAMES];
static int n_kernels;
static Row apis[1024];
static uint64_t memcpy_ns, memcpy_n, memcpy_bytes, memset_ns, memset_n;
// Copies by kind (1 HtoD, 2 DtoH, 8 DtoD; CUpti_ActivityMemcpyKind): calls, ns, bytes.
static uint64_t copy_n[16], copy_ns[16], copy_bytes[16];
// Small host-to-device copies not yet attributed: candle uploads a strided op's dims and
// strides just before launching it, so each is charged to the next kernel.
static uint64_t pending_uploads;
static uint64_t first_start = UINT64_MAX, last_end, busy_ns, busy_end;
static uint64_t dropped;

static Row *row(Row *rows, int *n, int cap, const char *name) {
  for (int i = 0; i < *n; i++)
    if (strcmp(rows[i].name, name) == 0) return &rows[i];
  if (*n >= cap) return &rows[cap - 1];
  rows[*n].name = strdup(name);
  return &rows[(*n)++];
}

static void span(uint64_t s, uint64_t e) {
  if (s < first_start) first_start = s;
  if (e > last_end) last_end = e;
  // Busy time as the union of intervals, assuming records arrive roughly in start order
  // (one stream): overlap with the previous end is not counted twice.
  if (s >= busy_end) {
    busy_ns += e - s;
    busy_end = e;
  } else if (e > busy_end) {
    busy_ns += e - busy_end;
    busy_end = e;
  }
}

static void CUPTIAPI request(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = (uint8_t *)aligned_alloc(8, BUF_SIZE);
  *size = BUF_SIZE;
  *max_records = 0;
}

static void CUPTIAPI complete(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                              size_t valid) {
  (void)ctx;
  (void)stream;
  (void)size;
  CUpti_Activity *rec = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)rec;
        char name[96];
        snprintf(name, sizeof name, "%s", k->name ? k->name : "?");
        Row *r = row(kernels, &n_kernels, MAX_NAMES, name);
        r->calls++;
        r->uploads += pending_uploads;
        pending_uploads = 0;
        r->ns += k->end - k->start;
        span(k->start, k->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)rec;
        memcpy_n++;
        memcpy_ns += m->end - m->start;
        memcpy_bytes += m->bytes;
        copy_n[m->copyKind & 15]++;
        copy_ns[m->copyKind & 15] += m->end - m->start;
        copy_bytes[m->copyKind & 15] += m->bytes;
        if (m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD && m->bytes <= 4096) pending_uploads++;
        span(m->start, m->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)rec;
        memset_n++;
        memset_ns += m->end - m->start;
        span(m->start, m->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)rec;
        if (a->cbid < 1024) {
          apis[a->cbid].calls++;
          apis[a->cbid].ns += a->end - a->start;
        }
        break;
      }
      default:
        break;
    }
  }
  size_t d = 0;
  cuptiActivityGetNumDroppedRecords(ctx, stream, &d);
  dropped += d;
  free(buffer);
}

static int by_ns(const void *a, const void *b) {
  const Row *x = a, *y = b;
  return x->ns < y->ns ? 1 : x->ns > y->ns ? -1 : 0;
}

static void report(void) {
  cuptiActivityFlushAll(1);
  const char *path = getenv("OMR_PROF_OUT");
  FILE *f = fopen(path ? path : "omr-prof.txt", "w");
  if (!f) return;
  uint64_t kernel_ns = 0, kernel_calls = 0;
  for (int i = 0; i < n_kernels; i++) {
    kernel_ns += kernels[i].ns;
    kernel_calls += kernels[i].calls;
  }
  double wall = last_end > first_start ? (last_end - first_start) / 1e6 : 0;
  fprintf(f, "GPU span %.1f ms, busy %.1f ms (%.0f%%); kernels %llu calls %.1f ms; memcpy %llu "
             "calls %.1f ms %.1f MB; memset %llu calls %.1f ms; dropped records %llu\n\n",
          wall, busy_ns / 1e6, wall > 0 ? 100.0 * busy_ns / 1e6 / wall : 0,
          (unsigned long long)kernel_calls, kernel_ns / 1e6, (unsigned long long)memcpy_n,
          memcpy_ns / 1e6, memcpy_bytes / 1e6, (unsigned long long)memset_n, memset_ns / 1e6,
          (unsigned long long)dropped);
  const char *kinds[16] = {[1] = "HtoD", [2] = "DtoH", [8] = "DtoD"};
  for (int k = 0; k < 16; k++)
    if (copy_n[k])
      fprintf(f, "memcpy %s: %llu calls, %.1f ms, %.1f MB\n", kinds[k] ? kinds[k] : "other",
              (unsigned long long)copy_n[k], copy_ns[k] / 1e6, copy_bytes[k] / 1e6);
  qsort(kernels, n_kernels, sizeof(Row), by_ns);
  fprintf(f, "\n%10s %8s %10s %6s %8s  %s\n", "total ms", "calls", "mean us", "share", "uploads",
          "kernel (uploads: small HtoD copies just before, e.g. strides of a strided op)");
  for (int i = 0; i < n_kernels && i < 70; i++)
    fprintf(f, "%10.2f %8llu %10.1f %5.1f%% %8llu  %s\n", kernels[i].ns / 1e6,
            (unsigned long long)kernels[i].calls, kernels[i].ns / 1e3 / kernels[i].calls,
            100.0 * kernels[i].ns / (kernel_ns ? kernel_ns : 1),
            (unsigned long long)kernels[i].uploads, kernels[i].name);
  Row api_rows[1024];
  int n_api = 0;
  for (int cbid = 0; cbid < 1024; cbid++) {
    if (!apis[cbid].calls) continue;
    const char *name = NULL;
    cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, cbid, &name);
    api_rows[n_api] = apis[cbid];
    api_rows[n_api].name = (char *)(name ? name : "?");
    n_api++;
  }
  qsort(api_rows, n_api, sizeof(Row), by_ns);
  fprintf(f, "\n%10s %8s %10s  %s\n", "host ms", "calls", "mean us", "driver call");
  for (int i = 0; i < n_api && i < 20; i++)
    fprintf(f, "%10.2f %8llu %10.1f  %s\n", api_rows[i].ns / 1e6,
            (unsigned long long)api_rows[i].calls, api_rows[i].ns / 1e3 / api_rows[i].calls,
            api_rows[i].name);
  fclose(f);
}

#define CHECK(x)                                                        \
  do {                                                                  \
    CUptiResult r_ = (x);                                               \
    if (r_ != CUPTI_SUCCESS) {                                          \
      const char *s_ = NULL;                                            \
      cuptiGetResultString(r_, &s_);                                    \
      fprintf(stderr, "omr_prof: %s failed: %s\n", #x, s_ ? s_ : "?"); \
      return 0;                                                         \
    }                                                                   \
  } while (0)

__attribute__((visibility("default"))) int InitializeInjection(void) {
  CHECK(cuptiActivityRegisterCallbacks(request, complete));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER));
  atexit(report);
  fprintf(stderr, "omr_prof: recording kernels, copies and driver calls\n");
  return 1;
}
