#include "json.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <set>

namespace moe {
namespace json {

const char* type_name(Type t) {
  switch (t) {
    case Type::Null: return "null";
    case Type::Bool: return "boolean";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "unknown";
}

const Value* Value::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& m : members) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

bool Value::as_uint(uint64_t max, uint64_t& out) const {
  if (type != Type::Number || text.empty() || text.size() > 20) return false;
  uint64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;  // sign, fraction or exponent
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  if (v > max) return false;
  out = v;
  return true;
}

// Returns the length of the UTF-8 sequence starting at p[0] (1..4) or 0 if invalid.
static size_t utf8_sequence(const unsigned char* p, size_t avail) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c == 0xE0) {
    n = 3; lo = 0xA0;                  // no overlongs
  } else if (c == 0xED) {
    n = 3; hi = 0x9F;                  // no surrogates
  } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
    n = 3;
  } else if (c == 0xF0) {
    n = 4; lo = 0x90;                  // no overlongs
  } else if (c >= 0xF1 && c <= 0xF3) {
    n = 4;
  } else if (c == 0xF4) {
    n = 4; hi = 0x8F;                  // max U+10FFFF
  } else {
    return 0;
  }
  if (avail < n) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if (p[i] < 0x80 || p[i] > 0xBF) return 0;
  }
  return n;
}

bool is_valid_utf8(const char* data, size_t size, size_t* bad_offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(data);
  size_t i = 0;
  while (i < size) {
    const size_t n = utf8_sequence(p + i, size - i);
    if (n == 0) {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    i += n;
  }
  return true;
}

namespace {

class Parser {
 public:
  Parser(const char* data, size_t size, const Limits& limits)
      : p_(reinterpret_cast<const unsigned char*>(data)), size_(size), limits_(limits) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != size_) fail("unexpected data after the JSON value");
    return v;
  }

 private:
  const unsigned char* p_;
  size_t size_;
  Limits limits_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw ParseError(what + " at byte " + std::to_string(pos_), pos_);
  }

  bool at_end() const { return pos_ >= size_; }
  unsigned char peek() const {
    if (at_end()) fail("unexpected end of input");
    return p_[pos_];
  }
  void expect(unsigned char c) {
    if (at_end() || p_[pos_] != c) fail(std::string("expected '") + static_cast<char>(c) + "'");
    ++pos_;
  }
  void skip_ws() {
    while (pos_ < size_) {
      const unsigned char c = p_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }
  void literal(const char* word) {
    for (const char* w = word; *w; ++w) {
      if (at_end() || p_[pos_] != static_cast<unsigned char>(*w)) fail(std::string("invalid literal, expected ") + word);
      ++pos_;
    }
  }

  Value parse_value(size_t depth) {
    Value v;
    const unsigned char c = peek();
    switch (c) {
      case '{': parse_object(v, depth + 1); break;
      case '[': parse_array(v, depth + 1); break;
      case '"': v.type = Type::String; v.text = parse_string(); break;
      case 't': literal("true"); v.type = Type::Bool; v.boolean = true; break;
      case 'f': literal("false"); v.type = Type::Bool; v.boolean = false; break;
      case 'n': literal("null"); v.type = Type::Null; break;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) {
          parse_number(v);
        } else {
          fail("unexpected character");
        }
    }
    return v;
  }

  void check_depth(size_t depth) const {
    if (depth > limits_.max_depth) fail("nesting deeper than " + std::to_string(limits_.max_depth));
  }

  void parse_object(Value& v, size_t depth) {
    check_depth(depth);
    v.type = Type::Object;
    expect('{');
    skip_ws();
    if (peek() == '}') { ++pos_; return; }
    std::set<std::string> seen;
    for (;;) {
      skip_ws();
      if (peek() != '"') fail("expected a string key");
      const size_t key_at = pos_;
      std::string key = parse_string();
      if (!seen.insert(key).second) {
        pos_ = key_at;
        fail("duplicate key \"" + key + "\"");
      }
      skip_ws();
      expect(':');
      skip_ws();
      Value member = parse_value(depth);
      v.members.emplace_back(std::move(key), std::move(member));
      skip_ws();
      const unsigned char c = peek();
      if (c == ',') { ++pos_; continue; }
      if (c == '}') { ++pos_; return; }
      fail("expected ',' or '}'");
    }
  }

  void parse_array(Value& v, size_t depth) {
    check_depth(depth);
    v.type = Type::Array;
    expect('[');
    skip_ws();
    if (peek() == ']') { ++pos_; return; }
    for (;;) {
      skip_ws();
      v.items.push_back(parse_value(depth));
      skip_ws();
      const unsigned char c = peek();
      if (c == ',') { ++pos_; continue; }
      if (c == ']') { ++pos_; return; }
      fail("expected ',' or ']'");
    }
  }

  unsigned hex4() {
    if (size_ - pos_ < 4) fail("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const unsigned char c = p_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<unsigned>(c - 'A' + 10);
      else { --pos_; fail("invalid hex digit in \\u escape"); }
    }
    return v;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      const unsigned char c = p_[pos_];
      if (c == '"') { ++pos_; return out; }
      if (c < 0x20) fail("unescaped control character in string");
      if (c == '\\') {
        ++pos_;
        if (at_end()) fail("unterminated escape");
        const unsigned char e = p_[pos_++];
        switch (e) {
          case '"': out.push_back('"'); break;
          case '\\': out.push_back('\\'); break;
          case '/': out.push_back('/'); break;
          case 'b': out.push_back('\b'); break;
          case 'f': out.push_back('\f'); break;
          case 'n': out.push_back('\n'); break;
          case 'r': out.push_back('\r'); break;
          case 't': out.push_back('\t'); break;
          case 'u': {
            unsigned cp = hex4();
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              if (size_ - pos_ < 2 || p_[pos_] != '\\' || p_[pos_ + 1] != 'u') fail("high surrogate not followed by a low surrogate");
              pos_ += 2;
              const unsigned lo = hex4();
              if (lo < 0xDC00 || lo > 0xDFFF) fail("high surrogate not followed by a low surrogate");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
              fail("lone low surrogate");
            }
            append_utf8(out, cp);
            break;
          }
          default:
            --pos_;
            fail("invalid escape");
        }
        continue;
      }
      const size_t n = utf8_sequence(p_ + pos_, size_ - pos_);
      if (n == 0) fail("invalid UTF-8 in string");
      out.append(reinterpret_cast<const char*>(p_ + pos_), n);
      pos_ += n;
    }
  }

  void parse_number(Value& v) {
    const size_t start = pos_;
    if (p_[pos_] == '-') ++pos_;
    if (at_end()) fail("truncated number");
    if (p_[pos_] == '0') {
      ++pos_;
    } else if (p_[pos_] >= '1' && p_[pos_] <= '9') {
      while (pos_ < size_ && p_[pos_] >= '0' && p_[pos_] <= '9') ++pos_;
    } else {
      fail("invalid number");
    }
    if (pos_ < size_ && p_[pos_] == '.') {
      ++pos_;
      if (at_end() || p_[pos_] < '0' || p_[pos_] > '9') fail("digit expected after '.'");
      while (pos_ < size_ && p_[pos_] >= '0' && p_[pos_] <= '9') ++pos_;
    }
    if (pos_ < size_ && (p_[pos_] == 'e' || p_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < size_ && (p_[pos_] == '+' || p_[pos_] == '-')) ++pos_;
      if (at_end() || p_[pos_] < '0' || p_[pos_] > '9') fail("digit expected in exponent");
      while (pos_ < size_ && p_[pos_] >= '0' && p_[pos_] <= '9') ++pos_;
    }
    v.type = Type::Number;
    v.text.assign(reinterpret_cast<const char*>(p_ + start), pos_ - start);
    // The literal is well-formed and NUL-terminated in `text`, so strtod stays in bounds.
    errno = 0;
    v.number = std::strtod(v.text.c_str(), nullptr);
    if (errno == ERANGE && std::isinf(v.number)) {
      pos_ = start;
      fail("number out of range");
    }
  }
};

}  // namespace

Value parse(const char* data, size_t size, const Limits& limits) {
  Parser parser(data, size, limits);
  return parser.parse_document();
}

}  // namespace json
}  // namespace moe
