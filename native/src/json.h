// A small strict JSON parser (RFC 8259) for file headers we do not trust:
// safetensors headers, later GGUF-adjacent metadata. Every read is bounds-checked,
// nesting depth is bounded, strings must be valid UTF-8 (escapes included, so lone
// surrogates are rejected), duplicate object keys are rejected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moe {
namespace json {

enum class Type { Null, Bool, Number, String, Array, Object };

const char* type_name(Type t);

struct Value {
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;      // Number: the parsed value
  std::string text;         // String: decoded UTF-8; Number: the literal as written
  std::vector<Value> items; // Array
  std::vector<std::pair<std::string, Value>> members;  // Object, in document order

  bool is_null() const { return type == Type::Null; }
  bool is_bool() const { return type == Type::Bool; }
  bool is_number() const { return type == Type::Number; }
  bool is_string() const { return type == Type::String; }
  bool is_array() const { return type == Type::Array; }
  bool is_object() const { return type == Type::Object; }

  // Object member by key, or nullptr.
  const Value* find(const std::string& key) const;

  // True when this is a Number written as a plain non-negative integer (no sign,
  // fraction or exponent) no larger than `max`; stores it in `out`.
  bool as_uint(uint64_t max, uint64_t& out) const;
};

struct ParseError : std::runtime_error {
  size_t offset;  // byte offset into the input where parsing failed
  ParseError(const std::string& what, size_t at) : std::runtime_error(what), offset(at) {}
};

struct Limits {
  size_t max_depth = 64;  // nesting of arrays/objects
};

// Parses exactly one JSON value from [data, data+size), allowing surrounding
// whitespace only. Throws ParseError.
Value parse(const char* data, size_t size, const Limits& limits = Limits());

// UTF-8 validity (no overlongs, no surrogates, max U+10FFFF). On failure stores the
// offset of the first bad byte in *bad_offset when given.
bool is_valid_utf8(const char* data, size_t size, size_t* bad_offset = nullptr);

}  // namespace json
}  // namespace moe
