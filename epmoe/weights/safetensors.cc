#include "epmoe/weights/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

namespace epmoe {

namespace {

using json = nlohmann::json;

// The dtype spellings of the safetensors format that epmoe stores; anything else (F64, BOOL,
// F8_E5M2, ...) is rejected rather than misread.
const char* safetensors_dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
  }
  return "?";
}

bool is_supported_dtype_name(const std::string& s) {
  for (DType t :
       {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3, DType::kI32, DType::kI64}) {
    if (s == safetensors_dtype_name(t)) return true;
  }
  return false;
}

// A JSON value that is a non-negative integer (not 2.0, not -1, not "3").
bool json_to_u64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = uint64_t(v.get<int64_t>());
    return true;
  }
  return false;
}

// Nesting depth of a JSON text (brackets outside strings), scanned without recursion: the
// parser's result is destroyed and printed recursively, so a hostile header with a million '['
// must be refused before it is parsed. Returns the byte offset where `max_depth` is exceeded, or
// -1.
int64_t json_depth_exceeded(const uint8_t* p, size_t n, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t c = p[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return int64_t(i);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return -1;
}

// The header: an object of tensors (and __metadata__, an object of strings): three levels.
constexpr int kMaxHeaderDepth = 8;
// The format's own bound on the header (the reference implementation refuses larger ones).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;
constexpr size_t kMaxTensors = 1u << 20;

// A short, non-recursive rendering of a JSON value for error messages.
std::string brief(const json& v) {
  if (v.is_primitive()) {
    std::string s = v.dump();
    return s.size() > 40 ? s.substr(0, 40) + "..." : s;
  }
  return fmt::format("a {} of {} element(s)", v.type_name(), v.size());
}

uint64_t read_le_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  EPMOE_CHECK(!path.empty(), kBadFile, "the safetensors file name is empty");
  // NOTES: stat before open: opening a FIFO (or a tty) for reading blocks until a writer comes.
  struct stat st {};
  EPMOE_CHECK(::stat(path.c_str(), &st) == 0, kBadFile, "cannot open safetensors file '{}': {}",
              path, std::strerror(errno));
  EPMOE_CHECK(S_ISREG(st.st_mode), kBadFile, "'{}' is not a regular file but a {}", path,
              S_ISDIR(st.st_mode)    ? "directory"
              : S_ISFIFO(st.st_mode) ? "FIFO"
              : S_ISCHR(st.st_mode)  ? "character device"
              : S_ISBLK(st.st_mode)  ? "block device"
              : S_ISSOCK(st.st_mode) ? "socket"
                                     : "special file");
  // O_NONBLOCK: should the path have been replaced by a FIFO since the stat, open does not hang.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  EPMOE_CHECK(fd >= 0, kBadFile, "cannot open safetensors file '{}': {}", path,
              std::strerror(errno));
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    EPMOE_FAIL(kBadFile, "'{}' is not a regular file", path);
  }
  size_ = size_t(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    EPMOE_FAIL(kBadFile, "'{}': file is {} bytes, shorter than the 8-byte header length", path,
               size_);
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  EPMOE_CHECK(p != MAP_FAILED, kBadFile, "cannot mmap '{}' ({} bytes): {}", path, size_,
              std::strerror(map_errno));
  base_ = static_cast<const uint8_t*>(p);
  try {
    parse_header();
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(base_), size_);
    base_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept { *this = std::move(other); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
    path_ = std::move(other.path_);
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    data_ = std::exchange(other.data_, nullptr);
    data_size_ = std::exchange(other.data_size_, 0);
    metadata_ = std::move(other.metadata_);
    entries_ = std::move(other.entries_);
  }
  return *this;
}

void SafetensorsFile::parse_header() {
  const uint64_t header_len = read_le_u64(base_);
  EPMOE_CHECK(header_len <= size_ - 8, kBadFile,
              "'{}': header length {} exceeds the {} bytes that follow it in the file", path_,
              header_len, size_ - 8);
  EPMOE_CHECK(header_len <= kMaxHeaderBytes, kBadFile,
              "'{}': header length {} exceeds the format's limit of {} bytes", path_, header_len,
              kMaxHeaderBytes);
  data_ = base_ + 8 + header_len;
  data_size_ = size_ - 8 - size_t(header_len);

  const int64_t deep = json_depth_exceeded(base_ + 8, size_t(header_len), kMaxHeaderDepth);
  EPMOE_CHECK(deep < 0, kBadFile, "'{}': header nests deeper than {} levels (at byte {})", path_,
              kMaxHeaderDepth, deep + 8);
  json header;
  std::string duplicate;
  try {
    // The callback sees every top-level key: a tensor named twice would otherwise be the last
    // one silently.
    std::set<std::string> keys;
    header = json::parse(base_ + 8, base_ + 8 + header_len,
                         [&](int depth, json::parse_event_t event, json& parsed) {
                           if (depth == 1 && event == json::parse_event_t::key &&
                               !keys.insert(parsed.get<std::string>()).second && duplicate.empty())
                             duplicate = parsed.get<std::string>();
                           return true;
                         });
  } catch (const json::exception& e) {
    EPMOE_FAIL(kBadFile, "'{}': header is not valid JSON ({})", path_, e.what());
  }
  EPMOE_CHECK(duplicate.empty(), kBadFile, "'{}': header names tensor '{}' more than once", path_,
              duplicate);
  EPMOE_CHECK(header.is_object(), kBadFile, "'{}': header is not a JSON object but a {}", path_,
              header.type_name());
  EPMOE_CHECK(header.size() <= kMaxTensors, kBadFile,
              "'{}': header lists {} entries, more than the {} epmoe reads", path_, header.size(),
              kMaxTensors);

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      EPMOE_CHECK(v.is_object(), kBadFile, "'{}': __metadata__ is not a JSON object", path_);
      for (auto m = v.begin(); m != v.end(); ++m) {
        EPMOE_CHECK(m.value().is_string(), kBadFile,
                    "'{}': __metadata__ value of '{}' is a {}, not a string", path_, m.key(),
                    m.value().type_name());
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    EPMOE_CHECK(v.is_object(), kBadFile, "'{}': tensor '{}' entry is not a JSON object", path_,
                name);
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      EPMOE_CHECK(v.contains(key), kBadFile, "'{}': tensor '{}' has no '{}'", path_, name, key);
    }
    SafetensorsEntry e;
    e.name = name;

    const json& dt = v["dtype"];
    EPMOE_CHECK(dt.is_string(), kBadFile, "'{}': tensor '{}' dtype is not a string", path_, name);
    const std::string dts = dt.get<std::string>();
    EPMOE_CHECK(is_supported_dtype_name(dts), kBadFile,
                "'{}': tensor '{}' has unsupported dtype '{}' (supported: BF16, F16, F32, "
                "F8_E4M3, I32, I64)",
                path_, name, dts);
    e.dtype = parse_dtype(dts);

    const json& sh = v["shape"];
    EPMOE_CHECK(sh.is_array(), kBadFile, "'{}': tensor '{}' shape is not an array", path_, name);
    EPMOE_CHECK(sh.size() <= size_t(kMaxDims), kBadFile,
                "'{}': tensor '{}' has rank {}, more than the supported {}", path_, name, sh.size(),
                kMaxDims);
    std::vector<int64_t> dims;
    uint64_t numel = 1;
    for (const json& d : sh) {
      uint64_t n = 0;
      EPMOE_CHECK(json_to_u64(d, &n) && n <= uint64_t(INT64_MAX), kBadFile,
                  "'{}': tensor '{}' has a negative or non-integer dimension {}", path_, name,
                  brief(d));
      EPMOE_CHECK(!__builtin_mul_overflow(numel, n, &numel) && numel <= uint64_t(INT64_MAX),
                  kBadFile, "'{}': tensor '{}': the element count of its shape overflows", path_,
                  name);
      dims.push_back(int64_t(n));
    }
    e.shape = Shape(dims);

    const json& off = v["data_offsets"];
    uint64_t begin = 0, end = 0;
    EPMOE_CHECK(off.is_array() && off.size() == 2 && json_to_u64(off[0], &begin) &&
                    json_to_u64(off[1], &end),
                kBadFile,
                "'{}': tensor '{}' data_offsets ({}) is not a pair of non-negative integers", path_,
                name, brief(off));
    EPMOE_CHECK(begin <= end, kBadFile, "'{}': tensor '{}' data_offsets [{}, {}] are out of order",
                path_, name, begin, end);
    EPMOE_CHECK(end <= data_size_, kBadFile,
                "'{}': tensor '{}' data_offsets [{}, {}] reach beyond the data section of {} bytes",
                path_, name, begin, end, data_size_);
    uint64_t expect_bytes = 0;
    EPMOE_CHECK(!__builtin_mul_overflow(numel, uint64_t(dtype_size(e.dtype)), &expect_bytes),
                kBadFile, "'{}': tensor '{}' shape {}: its byte size overflows", path_, name,
                e.shape.str());
    EPMOE_CHECK(end - begin == expect_bytes, kBadFile,
                "'{}': tensor '{}' holds {} bytes but {} {} needs {} bytes", path_, name,
                end - begin, dts, e.shape.str(), expect_bytes);
    e.offset = size_t(begin);
    e.nbytes = size_t(end - begin);
    entries_.emplace(name, std::move(e));
  }

  // Overlapping tensors would alias: no writer produces them, so they mean a corrupt header.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& kv : entries_) {
    if (kv.second.nbytes > 0) by_offset.push_back(&kv.second);
  }
  std::sort(
      by_offset.begin(), by_offset.end(),
      [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsEntry& a = *by_offset[i - 1];
    const SafetensorsEntry& b = *by_offset[i];
    EPMOE_CHECK(a.offset + a.nbytes <= b.offset, kBadFile,
                "'{}': tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", path_, a.name, a.offset,
                a.offset + a.nbytes, b.name, b.offset, b.offset + b.nbytes);
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  EPMOE_CHECK(it != entries_.end(), kMissingTensor, "tensor '{}' not found in '{}'", name, path_);
  return it->second;
}

TensorView SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  // const_cast: TensorView has no const flavour; the pages are read-only regardless.
  return TensorView{const_cast<uint8_t*>(data_ + e.offset), e.shape, e.dtype, Device::kCpu};
}

bool SafetensorsFile::is_aligned(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  return reinterpret_cast<uintptr_t>(data_ + e.offset) % dtype_size(e.dtype) == 0;
}

void write_safetensors(const std::string& path, const std::map<std::string, TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, TensorView>> order(tensors.begin(), tensors.end());
  for (const auto& [name, t] : order) {
    EPMOE_CHECK(!name.empty() && name != "__metadata__", kInvalidArgument,
                "invalid tensor name '{}' for '{}'", name, path);
    EPMOE_CHECK(t.device == Device::kCpu, kInvalidArgument,
                "tensor '{}' for '{}' is not in host memory", name, path);
    for (int i = 0; i < t.shape.rank; ++i) {
      EPMOE_CHECK(t.shape[i] >= 0, kInvalidArgument, "tensor '{}' for '{}' has shape {}", name,
                  path, t.shape.str());
    }
    EPMOE_CHECK(t.data != nullptr || t.nbytes() == 0, kInvalidArgument,
                "tensor '{}' for '{}' has no data", name, path);
  }
  // Largest element first: every offset stays a multiple of the element size.
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return dtype_size(a.second.dtype) > dtype_size(b.second.dtype);
  });

  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& [name, t] : order) {
    std::vector<int64_t> dims(t.shape.dims.begin(), t.shape.dims.begin() + t.shape.rank);
    header[name] = {{"dtype", safetensors_dtype_name(t.dtype)},
                    {"shape", dims},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  EPMOE_CHECK(f != nullptr, kBadFile, "cannot create '{}': {}", tmp, std::strerror(errno));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  bool ok =
      std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (const auto& kv : order) {
    if (!ok) break;
    const size_t n = kv.second.nbytes();
    ok = n == 0 || std::fwrite(kv.second.data, 1, n, f) == n;
  }
  ok = (std::fclose(f) == 0) && ok;
  if (ok) ok = std::rename(tmp.c_str(), path.c_str()) == 0;
  if (!ok) {
    const int err = errno;
    std::remove(tmp.c_str());
    EPMOE_FAIL(kBadFile, "cannot write '{}': {}", path, std::strerror(err));
  }
}

}  // namespace epmoe
