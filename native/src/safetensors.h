// safetensors files: read-only memory mapping and the JS binding. Validation lives in
// safetensors_format.h.
#pragma once

#include <napi.h>

#include "safetensors_format.h"

namespace moe {

// Registers safetensorsOpen and the SafetensorsMapping class on `exports`.
void RegisterSafetensors(Napi::Env env, Napi::Object exports);

}  // namespace moe
