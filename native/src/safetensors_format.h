// safetensors files: header validation (no Node-API here: the addon's binding in
// safetensors.h/.cc uses it, and so does the sanitizer fuzz harness in native/fuzz/).
//
// Layout: [u64 LE header length N][N bytes of UTF-8 JSON header][data section].
// Tensor data_offsets are relative to the start of the data section, begin
// inclusive, end exclusive. A file is accepted only when every entry is well formed
// and the tensors tile the data section exactly (no overlap, no hole, no tail).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moe {

// Error with a stable code, surfaced to JS as Error.code (ST_TRUNCATED, ST_HEADER_LENGTH,
// ST_HEADER_JSON, ST_BAD_ENTRY, ST_DTYPE, ST_SHAPE_MISMATCH, ST_OFFSET_RANGE,
// ST_OVERLAP, ST_HOLE, ST_IO).
struct StError : std::runtime_error {
  std::string code;
  StError(std::string c, const std::string& message) : std::runtime_error(message), code(std::move(c)) {}
};

constexpr uint64_t kStMaxHeaderBytes = 100ull * 1000 * 1000;
// Shapes and offsets cross to JS as numbers; keep them exact.
constexpr uint64_t kStMaxSafeInteger = (1ull << 53) - 1;

struct StTensor {
  std::string name;
  std::string dtype;
  std::vector<uint64_t> shape;
  uint64_t begin = 0;  // relative to the data section, inclusive
  uint64_t end = 0;    // exclusive
};

struct StLayout {
  uint64_t data_offset = 0;  // 8 + header length: where the data section starts
  uint64_t file_size = 0;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::vector<StTensor> tensors;  // in header order
};

// Element size in bytes of a safetensors dtype name, or 0 when unknown.
size_t st_dtype_size(const std::string& dtype);

// Validates a whole file image (header and the data section's extent) and returns
// its layout. `label` names the file in error messages. Throws StError.
StLayout st_parse(const uint8_t* file, uint64_t file_size, const std::string& label);

// st_fail with the file's label, for the binding's own checks (open, stat, mmap).
[[noreturn]] void st_fail(const char* code, const std::string& label, const std::string& problem);

}  // namespace moe
