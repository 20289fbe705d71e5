// safetensors files: a reader (mmap, validated) and a writer (atomic: nothing is left on error).
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
// "__metadata__": {str: str}}, then the data buffer. Offsets are relative to the buffer start.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moekit/tensor.h"

namespace moekit {

class SafetensorsFile {
 public:
  // Maps the file and validates the whole header: JSON shape, known dtypes, non-negative shapes,
  // offsets inside the file, sizes equal to numel * dtype size, no overlaps. Throws Error
  // (op "safetensors", argument = the path or tensor name) on anything malformed.
  static SafetensorsFile open(const std::string& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::string& path() const;
  std::vector<std::string> names() const;  // in file order of data offsets
  bool contains(const std::string& name) const;
  // CPU view of a tensor, valid while this object lives. Data that is not aligned to its element
  // size in the file is copied once into aligned memory owned by this object.
  TensorView get(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const;

 private:
  struct State;
  explicit SafetensorsFile(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

using NamedTensor = std::pair<std::string, TensorView>;

// Writes CPU tensors (any strides; written contiguous) to path atomically: the data goes to a
// temporary file in the same folder that is renamed over path only when complete.
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moekit
