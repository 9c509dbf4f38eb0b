/* CUDA device discovery, callable from the C++ addon without CUDA headers.
 * Implemented by device_probe.cu when built with CUDA, else by
 * device_probe_stub.cc (compiled = 0). Never throws, never aborts. */
#ifndef MOE_DEVICE_PROBE_H
#define MOE_DEVICE_PROBE_H

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CUDA_MAX_DEVICES 64

typedef struct MoeCudaDevice {
  char name[256];
  unsigned long long total_memory; /* bytes */
  int cc_major;
  int cc_minor;
} MoeCudaDevice;

typedef struct MoeCudaProbe {
  int compiled;      /* 1 when the addon was built with CUDA */
  int device_count;  /* devices usable by the runtime; 0 on any error */
  char error[512];   /* "" when no error */
  MoeCudaDevice devices[MOE_CUDA_MAX_DEVICES]; /* first min(device_count, MAX) */
} MoeCudaProbe;

/* Fills *out. */
void moe_cuda_probe(MoeCudaProbe* out);

#ifdef __cplusplus
}
#endif

#endif /* MOE_DEVICE_PROBE_H */
