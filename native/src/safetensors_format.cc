#include "safetensors_format.h"

#include <algorithm>
#include <cstring>

#include "json.h"

namespace moe {

// ---------------------------------------------------------------------------------
// Validation.

size_t st_dtype_size(const std::string& dtype) {
  static const std::pair<const char*, size_t> kSizes[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2},   {"I64", 8},     {"I32", 4},
      {"I16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1},   {"F8_E4M3", 1}, {"F8_E5M2", 1},
  };
  for (const auto& s : kSizes) {
    if (dtype == s.first) return s.second;
  }
  return 0;
}

void st_fail(const char* code, const std::string& label, const std::string& problem) {
  throw StError(code, "safetensors file " + label + ": " + problem);
}

namespace {

[[noreturn]] void st_tensor_fail(const char* code, const std::string& label, const std::string& tensor,
                                 const std::string& problem) {
  throw StError(code, "safetensors file " + label + ": tensor \"" + tensor + "\": " + problem);
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string shape_text(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

StTensor parse_entry(const std::string& label, const std::string& name, const json::Value& v) {
  if (!v.is_object()) {
    st_tensor_fail("ST_BAD_ENTRY", label, name, std::string("entry must be an object, got ") + json::type_name(v.type));
  }
  for (const auto& m : v.members) {
    if (m.first != "dtype" && m.first != "shape" && m.first != "data_offsets") {
      st_tensor_fail("ST_BAD_ENTRY", label, name, "unexpected key \"" + m.first + "\"");
    }
  }
  StTensor t;
  t.name = name;

  const json::Value* dtype = v.find("dtype");
  if (!dtype) st_tensor_fail("ST_BAD_ENTRY", label, name, "missing \"dtype\"");
  if (!dtype->is_string()) st_tensor_fail("ST_BAD_ENTRY", label, name, "\"dtype\" must be a string");
  t.dtype = dtype->text;
  const size_t elem = st_dtype_size(t.dtype);
  if (elem == 0) st_tensor_fail("ST_DTYPE", label, name, "unknown dtype \"" + t.dtype + "\"");

  const json::Value* shape = v.find("shape");
  if (!shape) st_tensor_fail("ST_BAD_ENTRY", label, name, "missing \"shape\"");
  if (!shape->is_array()) st_tensor_fail("ST_BAD_ENTRY", label, name, "\"shape\" must be an array");
  for (const auto& d : shape->items) {
    uint64_t n = 0;
    if (!d.as_uint(kStMaxSafeInteger, n)) {
      st_tensor_fail("ST_BAD_ENTRY", label, name,
                     "\"shape\" must hold non-negative integers below 2^53, got " +
                         (d.is_number() ? d.text : std::string(json::type_name(d.type))));
    }
    t.shape.push_back(n);
  }

  const json::Value* offsets = v.find("data_offsets");
  if (!offsets) st_tensor_fail("ST_BAD_ENTRY", label, name, "missing \"data_offsets\"");
  if (!offsets->is_array() || offsets->items.size() != 2) {
    st_tensor_fail("ST_BAD_ENTRY", label, name, "\"data_offsets\" must be an array of two integers");
  }
  uint64_t be[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    const json::Value& o = offsets->items[static_cast<size_t>(i)];
    if (!o.as_uint(kStMaxSafeInteger, be[i])) {
      st_tensor_fail("ST_BAD_ENTRY", label, name,
                     "\"data_offsets\" must hold non-negative integers below 2^53, got " +
                         (o.is_number() ? o.text : std::string(json::type_name(o.type))));
    }
  }
  t.begin = be[0];
  t.end = be[1];
  if (t.begin > t.end) {
    st_tensor_fail("ST_BAD_ENTRY", label, name,
                   "data_offsets begin " + std::to_string(t.begin) + " > end " + std::to_string(t.end));
  }

  uint64_t bytes = elem;
  for (uint64_t d : t.shape) {
    if (d != 0 && bytes > UINT64_MAX / d) {
      st_tensor_fail("ST_SHAPE_MISMATCH", label, name, "byte size of shape " + shape_text(t.shape) + " overflows");
    }
    bytes *= d;
  }
  if (bytes != t.end - t.begin) {
    st_tensor_fail("ST_SHAPE_MISMATCH", label, name,
                   "shape " + shape_text(t.shape) + " of " + t.dtype + " needs " + std::to_string(bytes) +
                       " bytes but data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                       "] span " + std::to_string(t.end - t.begin));
  }
  return t;
}

}  // namespace

StLayout st_parse(const uint8_t* file, uint64_t file_size, const std::string& label) {
  if (file_size < 8) {
    st_fail("ST_TRUNCATED", label, "file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");
  }
  const uint64_t header_len = read_u64_le(file);
  if (header_len == 0) st_fail("ST_HEADER_LENGTH", label, "header length is 0");
  if (header_len > kStMaxHeaderBytes) {
    st_fail("ST_HEADER_LENGTH", label,
            "header length " + std::to_string(header_len) + " exceeds the limit of " + std::to_string(kStMaxHeaderBytes));
  }
  if (header_len > file_size - 8) {
    st_fail("ST_HEADER_LENGTH", label,
            "header length " + std::to_string(header_len) + " runs past the end of the " + std::to_string(file_size) +
                "-byte file");
  }
  const char* header = reinterpret_cast<const char*>(file + 8);
  size_t bad = 0;
  if (!json::is_valid_utf8(header, header_len, &bad)) {
    st_fail("ST_HEADER_JSON", label, "header is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  }
  json::Value root;
  try {
    root = json::parse(header, header_len);
  } catch (const json::ParseError& e) {
    st_fail("ST_HEADER_JSON", label, std::string("header is not valid JSON: ") + e.what());
  }
  if (!root.is_object()) {
    st_fail("ST_HEADER_JSON", label, std::string("header must be a JSON object, got ") + json::type_name(root.type));
  }

  StLayout layout;
  layout.file_size = file_size;
  layout.data_offset = 8 + header_len;
  const uint64_t data_size = file_size - layout.data_offset;

  for (const auto& m : root.members) {
    if (m.first == "__metadata__") {
      if (!m.second.is_object()) st_fail("ST_BAD_ENTRY", label, "__metadata__ must be an object");
      for (const auto& kv : m.second.members) {
        if (!kv.second.is_string()) {
          st_fail("ST_BAD_ENTRY", label,
                  "__metadata__ value of \"" + kv.first + "\" must be a string, got " + json::type_name(kv.second.type));
        }
        layout.metadata.emplace_back(kv.first, kv.second.text);
      }
      continue;
    }
    layout.tensors.push_back(parse_entry(label, m.first, m.second));
  }

  for (const auto& t : layout.tensors) {
    if (t.end > data_size) {
      st_tensor_fail("ST_OFFSET_RANGE", label, t.name,
                     "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                         "] run past the end of the " + std::to_string(data_size) + "-byte data section");
    }
  }

  // The tensors must tile [0, data_size) exactly. Zero-byte tensors take no space.
  std::vector<const StTensor*> order;
  order.reserve(layout.tensors.size());
  for (const auto& t : layout.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const StTensor* a, const StTensor* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered = 0;
  const StTensor* prev = nullptr;
  for (const StTensor* t : order) {
    if (t->begin < covered) {
      st_tensor_fail("ST_OVERLAP", label, t->name,
                     "bytes [" + std::to_string(t->begin) + ", " + std::to_string(t->end) + ") overlap tensor \"" +
                         (prev ? prev->name : std::string()) + "\" ending at " + std::to_string(covered));
    }
    if (t->begin > covered) {
      st_tensor_fail("ST_HOLE", label, t->name,
                     "data starts at " + std::to_string(t->begin) + " but the previous tensor ends at " +
                         std::to_string(covered) + ": bytes [" + std::to_string(covered) + ", " +
                         std::to_string(t->begin) + ") belong to no tensor");
    }
    if (t->end > t->begin) {
      covered = t->end;
      prev = t;
    }
  }
  if (covered != data_size) {
    st_fail("ST_HOLE", label,
            "data section is " + std::to_string(data_size) + " bytes but the tensors cover only " +
                std::to_string(covered) + ": bytes [" + std::to_string(covered) + ", " + std::to_string(data_size) +
                ") belong to no tensor");
  }
  return layout;
}

}  // namespace moe
