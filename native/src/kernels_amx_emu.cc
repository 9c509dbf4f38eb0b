// The AMX kernel of kernels_amx.cc with its tile instructions modelled in C++ and its
// scaling in scalar IEEE operations, compiled for the baseline ISA: it runs on any host,
// so that the tests check the kernel's tiling and layouts (amxMatmulTest) where no AMX
// CPU is available. Never used to serve.
#define MOE_AMX_EMULATED 1
#include "kernels_amx.cc"
