#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>

#include "json.h"

namespace moe {

// ---------------------------------------------------------------------------------
// Validation (no Node-API here: usable from a standalone harness).

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

namespace {

[[noreturn]] void st_fail(const char* code, const std::string& label, const std::string& problem) {
  throw StError(code, "safetensors file " + label + ": " + problem);
}

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

// ---------------------------------------------------------------------------------
// Mapping and the JS binding.

namespace {

// One read-only mapping of a whole file. Shared between the SafetensorsMapping
// handle and the ArrayBuffer finalizer; unmapped by an explicit close() or when the
// last owner goes, whichever comes first, and never twice.
class Mapping {
 public:
  Mapping(void* addr, size_t size) : addr_(addr), size_(size) {}
  ~Mapping() { unmap(); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  void* addr() const { return addr_; }
  size_t size() const { return size_; }
  bool unmapped() const { return unmapped_.load(); }
  void unmap() {
    if (!unmapped_.exchange(true)) munmap(addr_, size_);
  }

 private:
  void* addr_;
  size_t size_;
  std::atomic<bool> unmapped_{false};
};

std::string errno_text(int err) { return std::strerror(err); }

// Opens and maps `path` read-only. Throws StError(ST_IO / ST_TRUNCATED).
std::shared_ptr<Mapping> map_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) st_fail("ST_IO", path, "cannot open: " + errno_text(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    st_fail("ST_IO", path, "cannot stat: " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    st_fail("ST_IO", path, "not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    st_fail("ST_TRUNCATED", path, "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  }
  void* addr = mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (addr == MAP_FAILED) st_fail("ST_IO", path, "mmap failed: " + errno_text(err));
  return std::make_shared<Mapping>(addr, static_cast<size_t>(size));
}

// JS handle of an open file: `close()` detaches the ArrayBuffer (so no JS view can
// read unmapped memory) and unmaps. Created only by safetensorsOpen.
class SafetensorsMapping : public Napi::ObjectWrap<SafetensorsMapping> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SafetensorsMapping",
                       {
                           InstanceMethod<&SafetensorsMapping::Close>("close"),
                           InstanceAccessor<&SafetensorsMapping::Closed>("closed"),
                           InstanceAccessor<&SafetensorsMapping::ByteLength>("byteLength"),
                       });
  }

  explicit SafetensorsMapping(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SafetensorsMapping>(info) {
    if (info.Length() != 2 || !info[0].IsExternal() || !info[1].IsArrayBuffer()) {
      throw Napi::TypeError::New(info.Env(), "SafetensorsMapping is created by safetensorsOpen() only");
    }
    mapping_ = *info[0].As<Napi::External<std::shared_ptr<Mapping>>>().Data();
    buffer_ = Napi::Weak(info[1].As<Napi::ArrayBuffer>());
  }

 private:
  std::shared_ptr<Mapping> mapping_;
  Napi::Reference<Napi::ArrayBuffer> buffer_;  // weak: the handle must not keep it alive

  void Close(const Napi::CallbackInfo&) {
    if (!mapping_) return;
    if (!buffer_.IsEmpty()) {
      Napi::ArrayBuffer ab = buffer_.Value();
      if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
    }
    buffer_.Reset();
    mapping_->unmap();
    mapping_.reset();
  }

  Napi::Value Closed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !mapping_); }

  Napi::Value ByteLength(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), mapping_ ? static_cast<double>(mapping_->size()) : 0.0);
  }
};

Napi::Value SafetensorsOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) {
    throw Napi::TypeError::New(env, "safetensorsOpen(path): path must be a string");
  }
  const std::string path = info[0].As<Napi::String>().Utf8Value();
  auto* ctor = static_cast<Napi::FunctionReference*>(info.Data());

  std::shared_ptr<Mapping> mapping;
  StLayout layout;
  try {
    mapping = map_file(path);
    layout = st_parse(static_cast<const uint8_t*>(mapping->addr()), mapping->size(), path);
  } catch (const StError& e) {
    if (mapping) mapping->unmap();
    Napi::Error err = Napi::Error::New(env, e.what());
    err.Set("code", Napi::String::New(env, e.code));
    throw err;
  }

  // The finalizer owns one reference to the mapping; it may run long after close().
  auto* owner = new std::shared_ptr<Mapping>(mapping);
  Napi::ArrayBuffer buffer;
  try {
    buffer = Napi::ArrayBuffer::New(
        env, mapping->addr(), mapping->size(),
        [](Napi::Env, void*, std::shared_ptr<Mapping>* hint) { delete hint; }, owner);
  } catch (...) {
    delete owner;  // not adopted by a finalizer
    throw;
  }

  std::shared_ptr<Mapping> for_handle = mapping;
  Napi::Object handle = ctor->New({Napi::External<std::shared_ptr<Mapping>>::New(env, &for_handle), buffer});

  Napi::Object metadata = Napi::Object::New(env);
  for (const auto& kv : layout.metadata) metadata.Set(kv.first, kv.second);

  Napi::Array tensors = Napi::Array::New(env, layout.tensors.size());
  for (size_t i = 0; i < layout.tensors.size(); ++i) {
    const StTensor& t = layout.tensors[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", t.name);
    o.Set("dtype", t.dtype);
    Napi::Array shape = Napi::Array::New(env, t.shape.size());
    for (size_t d = 0; d < t.shape.size(); ++d) shape.Set(static_cast<uint32_t>(d), static_cast<double>(t.shape[d]));
    o.Set("shape", shape);
    o.Set("begin", static_cast<double>(t.begin));
    o.Set("end", static_cast<double>(t.end));
    tensors.Set(static_cast<uint32_t>(i), o);
  }

  Napi::Object result = Napi::Object::New(env);
  result.Set("handle", handle);
  result.Set("buffer", buffer);
  result.Set("dataOffset", static_cast<double>(layout.data_offset));
  result.Set("fileSize", static_cast<double>(layout.file_size));
  result.Set("metadata", metadata);
  result.Set("tensors", tensors);
  return result;
}

}  // namespace

void RegisterSafetensors(Napi::Env env, Napi::Object exports) {
  Napi::Function cls = SafetensorsMapping::Define(env);
  // Per-environment (each worker thread loads its own copy of the exports).
  auto* ctor = new Napi::FunctionReference(Napi::Persistent(cls));
  env.AddCleanupHook([ctor]() { delete ctor; });
  exports.Set("SafetensorsMapping", cls);
  exports.Set("safetensorsOpen", Napi::Function::New(env, SafetensorsOpen, "safetensorsOpen", ctor));
}

}  // namespace moe
