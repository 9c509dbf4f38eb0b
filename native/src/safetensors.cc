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
