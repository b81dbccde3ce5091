// Safetensors files (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON header, then the raw little-endian tensor bytes. The reader maps the
// file read-only and hands out zero-copy views into the mapping; the writer is for tests and
// tools. Every malformed input throws Error(kBadFile) naming the file and the problem.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "epmoe/core/tensor.h"

namespace epmoe {

// One tensor of the header. `offset` is relative to the start of the data section (byte 8 + N
// of the file), as in the header's `data_offsets`.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  size_t offset = 0;
  size_t nbytes = 0;
};

class SafetensorsFile {
 public:
  // Maps `path` and validates the whole header (dtypes BF16/F16/F32/F8_E4M3/I32/I64, rank <= 4,
  // integer non-negative dims, offsets ordered, inside the data section, sized numel * dtype size
  // and not overlapping). Throws Error(kBadFile) naming the file and the problem.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  size_t file_size() const { return size_; }
  // `__metadata__` of the header (string -> string); empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  std::vector<std::string> names() const;  // sorted
  size_t num_tensors() const { return entries_.size(); }

  // Throws Error(kMissingTensor) naming the tensor and the file.
  const SafetensorsEntry& entry(const std::string& name) const;
  // Zero-copy view into the mapping, device kCpu, valid while this object lives.
  // NOTES: the mapping is PROT_READ: the view's data is const in fact, writing through it faults.
  // Files written by other tools may leave a tensor misaligned for its dtype (the format only
  // guarantees byte offsets); read such data with memcpy, or check is_aligned().
  TensorView tensor(const std::string& name) const;
  bool is_aligned(const std::string& name) const;

 private:
  void parse_header();

  std::string path_;
  const uint8_t* base_ = nullptr;  // the mapping: [size_] bytes
  size_t size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  size_t data_size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, SafetensorsEntry> entries_;
};

// Writes host tensors (any of the six dtypes, rank <= 4) and string metadata to `path`.
// Tensors are laid out largest dtype first, so every tensor is aligned for its dtype when the
// data section is (the header is padded with spaces to a multiple of 8 bytes). The file is
// written to `path.tmp` and renamed, so readers never see half a file.
// Throws Error(kInvalidArgument) for a bad tensor, Error(kBadFile) when writing fails.
void write_safetensors(const std::string& path, const std::map<std::string, TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace epmoe
