// Mutation fuzzer for the safetensors header validation (safetensors_format.cc) and the
// JSON parser under it (json.cc), built with AddressSanitizer and UBSan by
// test/native-fuzz.test.ts:
//
//   fuzz_safetensors ITERATIONS SEED
//
// Each iteration writes a file image (a header of 1-4 tensors of several dtypes tiling
// the data section, or with a hole or an overlap between two of them), mutates it (bytes, deletions, JSON tokens and numbers that
// overflow, truncation, a wrong header length, a short or long data section, a truncated
// file size) and hands it to st_parse. A rejected file must throw StError; an accepted
// one must satisfy what st_parse promises: every tensor's bytes inside the data section,
// its byte count that of its dtype and shape, the tensors tiling the section exactly.
// json::parse also gets each mutated header on its own. Any other exception, a broken
// promise or a sanitizer report ends the run with a non-zero status. Deterministic for a
// given seed. Prints "iterations N accepted A rejected R".
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "json.h"
#include "safetensors_format.h"

using moe::StError;
using moe::StLayout;

namespace {

std::mt19937_64 rng;

uint64_t pick(uint64_t n) { return n == 0 ? 0 : rng() % n; }

struct Image {
  std::string header;
  uint64_t data_len = 0;
};

// A file image of 1-4 tensors: a valid layout (entries in any order), or, one time in
// four, one with a layout error that only the tiling check can see (every entry well formed,
// sizes matching shapes): a hole between two tensors or a tensor overlapping the one before.
Image make_image() {
  static const char* kDtypes[] = {"F32", "F16", "BF16", "I8", "U8", "F64", "I64", "BOOL", "I32", "F8_E4M3"};
  const int n = 1 + static_cast<int>(pick(4));
  const int bad = pick(4) == 0 ? static_cast<int>(pick(n)) : -1;  // the tensor whose placement is wrong
  std::vector<std::string> entries;
  uint64_t off = 0, prev_len = 0;
  for (int i = 0; i < n; ++i) {
    const char* d = kDtypes[pick(sizeof kDtypes / sizeof *kDtypes)];
    const uint64_t a = 1 + pick(5), b = pick(7);
    const uint64_t len = a * b * moe::st_dtype_size(d);
    uint64_t begin = off;
    if (i == bad) {
      if (pick(2) && prev_len > 0) begin = off - 1 - pick(prev_len);  // overlap
      else begin = off + 1 + pick(16);                                // hole
    }
    entries.push_back("\"t" + std::to_string(i) + "\":{\"dtype\":\"" + std::string(d) + "\",\"shape\":[" + std::to_string(a) + "," +
                      std::to_string(b) + "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(begin + len) + "]}");
    off = std::max(off, begin + len);
    prev_len = len;
  }
  std::shuffle(entries.begin(), entries.end(), rng);
  Image im;
  im.header = pick(2) ? "{\"__metadata__\":{\"format\":\"pt\"}" : "{";
  for (const auto& e : entries) im.header += (im.header.size() > 1 ? "," : "") + e;
  im.header += "}";
  im.header += std::string(pick(8), ' ');  // the format allows trailing spaces
  im.data_len = off;
  return im;
}

const char* kTokens[] = {"{", "}", "[", "]", ",", ":", "\"", "\\", "\\u", "\\ud800", "\\udc00", "\\u0000", "-",
                         "0", "1e999", "-1", "18446744073709551616", "9007199254740993", "9007199254740991",
                         "1.5", "00", "null", "true", "\xff", "\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                         "dtype", "shape", "data_offsets", "__metadata__"};
const char* kNumbers[] = {"0", "1", "-1", "1e999", "18446744073709551615", "18446744073709551616",
                          "9007199254740993", "4294967296", "1.0", "-0"};

void mutate(std::string& h) {
  const int muts = static_cast<int>(pick(4));
  for (int m = 0; m < muts && !h.empty(); ++m) {
    const size_t p = pick(h.size());
    switch (pick(8)) {
      case 0: h[p] = static_cast<char>(rng()); break;
      case 7: h.insert(p, 1, '\0'); break;
      case 1: h.erase(p, 1 + pick(8)); break;
      case 2: h.insert(p, kTokens[pick(sizeof kTokens / sizeof *kTokens)]); break;
      case 3: {  // a number replaced by an edge value
        const size_t q = h.find_first_of("0123456789", p);
        if (q != std::string::npos) {
          const size_t e = h.find_first_not_of("0123456789", q);
          h.replace(q, (e == std::string::npos ? h.size() : e) - q, kNumbers[pick(sizeof kNumbers / sizeof *kNumbers)]);
        }
        break;
      }
      case 4: h.resize(p); break;
      case 5: h.insert(p, std::string(1 + pick(200), "[{"[pick(2)])); break;  // deep nesting
      case 6: {  // a span of the header repeated (duplicate keys, tensors)
        const size_t len = std::min<size_t>(h.size() - p, 1 + pick(80));
        h.insert(pick(h.size()), h.substr(p, len));
        break;
      }
    }
  }
}

[[noreturn]] void broken(long it, const std::string& what) {
  std::fprintf(stderr, "iteration %ld: %s\n", it, what.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  const long iterations = argc > 1 ? std::atol(argv[1]) : 100000;
  rng.seed(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1);
  long accepted = 0, rejected = 0;
  for (long it = 0; it < iterations; ++it) {
    Image im = make_image();
    std::string h = im.header;
    mutate(h);
    uint64_t header_len = h.size();
    switch (pick(12)) {
      case 0: header_len = rng(); break;
      case 1: header_len = h.size() + 1; break;
      case 2: header_len = h.empty() ? 0 : h.size() - 1; break;
      case 3: header_len = 0; break;
      default: break;
    }
    uint64_t data_len = im.data_len;
    switch (pick(8)) {
      case 0: data_len = data_len > 0 ? data_len - 1 : 0; break;
      case 1: data_len += 1; break;
      case 2: data_len = 0; break;
      default: break;
    }
    std::vector<uint8_t> file(8 + h.size() + data_len, 0xA5);
    for (int i = 0; i < 8; ++i) file[i] = static_cast<uint8_t>(header_len >> (8 * i));
    std::memcpy(file.data() + 8, h.data(), h.size());
    uint64_t size = file.size();
    if (pick(16) == 0) size = pick(size + 1);
    // The parser sees exactly `size` bytes: a copy of that length, so that ASan catches a read past it.
    std::vector<uint8_t> exact(file.begin(), file.begin() + static_cast<std::ptrdiff_t>(size));
    try {
      const StLayout l = moe::st_parse(exact.data(), size, "fuzz");
      ++accepted;
      if (l.data_offset != 8 + header_len || l.data_offset > size || l.file_size != size) broken(it, "layout extent");
      const uint64_t data = size - l.data_offset;
      std::vector<std::pair<uint64_t, uint64_t>> spans;
      for (const auto& t : l.tensors) {
        const size_t es = moe::st_dtype_size(t.dtype);
        if (es == 0) broken(it, "accepted an unknown dtype " + t.dtype);
        uint64_t count = 1;
        for (uint64_t d : t.shape) count *= d;
        if (t.begin > t.end || t.end > data) broken(it, "tensor " + t.name + " outside the data section");
        if (t.end - t.begin != count * es) broken(it, "tensor " + t.name + " size does not match its shape");
        spans.emplace_back(t.begin, t.end);
      }
      std::sort(spans.begin(), spans.end());
      uint64_t at = 0;
      for (const auto& s : spans) {
        if (s.first != at) broken(it, "tensors do not tile the data section");
        at = s.second;
      }
      if (at != data) broken(it, "data section not covered");
    } catch (const StError&) {
      ++rejected;
    } catch (const std::exception& e) {
      broken(it, std::string("st_parse threw a non-StError: ") + e.what());
    }
    std::vector<char> text(h.begin(), h.end());  // exact length again
    try {
      moe::json::parse(text.data(), text.size());
    } catch (const moe::json::ParseError&) {
    } catch (const std::exception& e) {
      broken(it, std::string("json::parse threw a non-ParseError: ") + e.what());
    }
  }
  std::printf("iterations %ld accepted %ld rejected %ld\n", iterations, accepted, rejected);
  return 0;
}
