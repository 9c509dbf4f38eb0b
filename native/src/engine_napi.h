#pragma once

#include <napi.h>

namespace moe {

// Registers the NativeEngine class on `exports`.
void RegisterEngine(Napi::Env env, Napi::Object exports);

}  // namespace moe
