#include "moekit/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

#include "moekit/error.h"

namespace moekit {

// The file format is little-endian and the reader hands out views straight into the mapping.
static_assert(std::endian::native == std::endian::little, "safetensors needs a little-endian host");

namespace {

constexpr const char* kOp = "safetensors";
constexpr const char* kMetadataKey = "__metadata__";
// Same cap as the official implementation: a larger header is a corrupt length, not a real model.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// A valid header nests three levels ({tensor: {shape: [...]}}); deeper input is rejected early so
// that a hostile header cannot make the parser build huge nested structures.
constexpr size_t kMaxJsonDepth = 16;

using Json = nlohmann::json;

std::string errno_text(int err) { return std::strerror(err); }

// A JSON value for an error message, cut short so a hostile header cannot flood the message.
std::string short_dump(const Json& j) {
  std::string s = j.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 64) s = s.substr(0, 61) + "...";
  return s;
}

std::string supported_dtypes() {
  std::string s;
  for (DType d : kAllDTypes) {
    if (!s.empty()) s += ", ";
    s += safetensors_dtype_name(d);
  }
  return s;
}

// Accepts only the safetensors spelling ("BF16"), not our own names ("bf16").
bool parse_safetensors_dtype(const std::string& name, DType* out) {
  try {
    const DType d = parse_dtype(name);
    if (safetensors_dtype_name(d) != name) return false;
    *out = d;
    return true;
  } catch (const Error&) {
    return false;
  }
}

// A JSON integer >= 0 that fits in uint64, or nothing.
bool as_unsigned(const Json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(j.get<int64_t>());
    return true;
  }
  return false;
}

struct Entry {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

// Parses the header, rejecting duplicate keys (nlohmann would silently keep the last one, which
// makes a header mean different things to different readers) and absurd nesting.
Json parse_header(const char* begin, const char* end, const std::string& path) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  size_t depth = 0;
  auto callback = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (++depth > kMaxJsonDepth)
          fail(kOp, "path", path,
               "has a header nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
        if (event == Json::parse_event_t::object_start) keys.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        keys.pop_back();
        --depth;
        break;
      case Json::parse_event_t::array_end:
        --depth;
        break;
      case Json::parse_event_t::key:
        if (!keys.back().insert(parsed.get<std::string>()).second)
          fail(kOp, "path", path,
               "has a header with the key " + short_dump(parsed) + " more than once");
        break;
      case Json::parse_event_t::value:
        break;
    }
    return true;
  };
  // nlohmann stops at a NUL byte as if the input ended there, which would accept "{}\0garbage".
  if (std::memchr(begin, '\0', static_cast<size_t>(end - begin)) != nullptr)
    fail(kOp, "path", path, "has a header that is not valid JSON: it contains a NUL byte");
  try {
    return Json::parse(begin, end, callback, /*allow_exceptions=*/true);
  } catch (const Json::exception& e) {
    fail(kOp, "path", path, std::string("has a header that is not valid JSON: ") + e.what());
  }
}

Entry parse_entry(const std::string& name, const Json& j, uint64_t buffer_size,
                  const std::string& path) {
  const std::string in_file = " in " + path;
  if (!j.is_object())
    fail(kOp, name, short_dump(j),
         "must be an object with dtype, shape and data_offsets" + in_file);
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!j.contains(field)) fail(kOp, name + "." + field, "<missing>", "is required" + in_file);

  Entry e;
  e.name = name;
  const Json& dtype = j["dtype"];
  if (!dtype.is_string() || !parse_safetensors_dtype(dtype.get<std::string>(), &e.dtype))
    fail(kOp, name + ".dtype", short_dump(dtype),
         "is not a supported dtype (" + supported_dtypes() + ")" + in_file);

  const Json& shape = j["shape"];
  if (!shape.is_array())
    fail(kOp, name + ".shape", short_dump(shape), "must be an array of dimensions" + in_file);
  if (shape.size() > static_cast<size_t>(kMaxDims))
    fail(kOp, name + ".shape", short_dump(shape),
         "has more than " + std::to_string(kMaxDims) + " dimensions" + in_file);
  // Bounding the product of the non-zero dimensions bounds every partial product too, so numel(),
  // nbytes() and the strides TensorView derives cannot overflow, whatever the order of the dims.
  const uint64_t esize = dtype_size(e.dtype);
  const uint64_t limit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / esize;
  uint64_t nonzero_product = 1;
  uint64_t numel = 1;
  for (const Json& dim : shape) {
    uint64_t d = 0;
    if (!as_unsigned(dim, &d))
      fail(kOp, name + ".shape", short_dump(shape),
           "must hold non-negative integers, not " + short_dump(dim) + in_file);
    if (d > 0 && nonzero_product > limit / d)
      fail(kOp, name + ".shape", short_dump(shape), "is too large: its size overflows" + in_file);
    if (d > 0) nonzero_product *= d;
    numel *= d;
    e.shape.push_back(static_cast<int64_t>(d));
  }
  const uint64_t nbytes = numel * esize;

  const Json& offsets = j["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !as_unsigned(offsets[0], &e.begin) ||
      !as_unsigned(offsets[1], &e.end))
    fail(kOp, name + ".data_offsets", short_dump(offsets),
         "must be [begin, end] with non-negative integers" + in_file);
  if (e.begin > e.end)
    fail(kOp, name + ".data_offsets", short_dump(offsets), "has begin > end" + in_file);
  if (e.end > buffer_size)
    fail(kOp, name + ".data_offsets", short_dump(offsets),
         "ends past the data buffer of " + std::to_string(buffer_size) + " bytes" + in_file);
  if (e.end - e.begin != nbytes)
    fail(kOp, name + ".data_offsets", short_dump(offsets),
         "span " + std::to_string(e.end - e.begin) + " bytes but shape " + short_dump(shape) +
             " of " + std::string(safetensors_dtype_name(e.dtype)) + " needs " +
             std::to_string(nbytes) + in_file);
  return e;
}

std::map<std::string, std::string> parse_metadata(const Json& j, const std::string& path) {
  if (!j.is_object())
    fail(kOp, kMetadataKey, short_dump(j), "must be an object of strings in " + path);
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : j.items()) {
    if (!value.is_string())
      fail(kOp, std::string(kMetadataKey) + "." + key, short_dump(value),
           "must be a string in " + path);
    out.emplace(key, value.get<std::string>());
  }
  return out;
}

// Closes a file descriptor on scope exit.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

struct SafetensorsFile::State {
  std::string path;
  void* map = MAP_FAILED;
  size_t map_size = 0;
  const char* buffer = nullptr;  // start of the data buffer inside the mapping
  std::vector<Entry> entries;    // sorted by data offset
  std::map<std::string, size_t> index;
  std::map<std::string, std::string> metadata;
  // Aligned copies of tensors whose bytes sit misaligned in the file, made on first get().
  mutable std::mutex copies_mutex;
  mutable std::map<std::string, Tensor> copies;

  ~State() {
    if (map != MAP_FAILED) ::munmap(map, map_size);
  }
};

SafetensorsFile::SafetensorsFile(std::unique_ptr<State> state) : state_(std::move(state)) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto st = std::make_unique<State>();
  st->path = path;

  // O_NONBLOCK so that opening a FIFO fails below instead of hanging; regular files ignore it.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(kOp, "path", path, "cannot be opened: " + errno_text(errno));
  FdCloser closer{fd};
  struct stat info {};
  if (::fstat(fd, &info) != 0) fail(kOp, "path", path, "cannot be read: " + errno_text(errno));
  if (S_ISDIR(info.st_mode)) fail(kOp, "path", path, "is a directory, not a safetensors file");
  if (!S_ISREG(info.st_mode)) fail(kOp, "path", path, "is not a regular file");
  const auto file_size = static_cast<uint64_t>(info.st_size);
  if (file_size < 8)
    fail(kOp, "path", path,
         "is too short (" + std::to_string(file_size) +
             " bytes): a safetensors file starts with an 8-byte header length");

  st->map_size = static_cast<size_t>(file_size);
  st->map = ::mmap(nullptr, st->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (st->map == MAP_FAILED) fail(kOp, "path", path, "cannot be mapped: " + errno_text(errno));
  const auto* base = static_cast<const unsigned char*>(st->map);

  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | base[i];
  const std::string in_file = " in " + path;
  if (header_size > kMaxHeaderBytes)
    fail(kOp, "header_length", std::to_string(header_size),
         "exceeds the limit of " + std::to_string(kMaxHeaderBytes) + " bytes" + in_file);
  if (header_size > file_size - 8)
    fail(kOp, "header_length", std::to_string(header_size),
         "runs past the end of the file (" + std::to_string(file_size) +
             " bytes): the file is truncated or corrupt" + in_file);

  const char* header = reinterpret_cast<const char*>(base) + 8;
  const Json json = parse_header(header, header + header_size, path);
  if (!json.is_object())
    fail(kOp, "path", path, "has a header that is not a JSON object but " + short_dump(json));

  st->buffer = header + header_size;
  const uint64_t buffer_size = file_size - 8 - header_size;
  for (const auto& [key, value] : json.items()) {
    if (key == kMetadataKey) {
      st->metadata = parse_metadata(value, path);
    } else {
      st->entries.push_back(parse_entry(key, value, buffer_size, path));
    }
  }

  std::sort(st->entries.begin(), st->entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  // Zero-size tensors own no bytes, so they cannot overlap anything.
  const Entry* previous = nullptr;
  for (const Entry& e : st->entries) {
    if (e.begin == e.end) continue;
    if (previous && e.begin < previous->end)
      fail(kOp, e.name + ".data_offsets",
           "[" + std::to_string(e.begin) + "," + std::to_string(e.end) + "]",
           "overlaps tensor " + previous->name + " at [" + std::to_string(previous->begin) + "," +
               std::to_string(previous->end) + "]" + in_file);
    previous = &e;
  }
  for (size_t i = 0; i < st->entries.size(); ++i) st->index.emplace(st->entries[i].name, i);
  return SafetensorsFile(std::move(st));
}

const std::string& SafetensorsFile::path() const { return state_->path; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(state_->entries.size());
  for (const Entry& e : state_->entries) out.push_back(e.name);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const {
  return state_->index.count(name) != 0;
}

TensorView SafetensorsFile::get(const std::string& name) const {
  const auto it = state_->index.find(name);
  if (it == state_->index.end()) fail(kOp, "name", name, "is not a tensor in " + state_->path);
  const Entry& e = state_->entries[it->second];
  // The mapping is read-only: the view is non-const only because TensorView has no const flavour.
  void* data = const_cast<char*>(state_->buffer + e.begin);
  const TensorView in_file(data, e.dtype, e.shape);
  if (reinterpret_cast<uintptr_t>(data) % dtype_size(e.dtype) == 0) return in_file;

  std::lock_guard<std::mutex> lock(state_->copies_mutex);
  auto copy = state_->copies.find(name);
  if (copy == state_->copies.end())
    copy = state_->copies.emplace(name, Tensor::copy_of(in_file, Device::cpu())).first;
  return copy->second.view();
}

const std::map<std::string, std::string>& SafetensorsFile::metadata() const {
  return state_->metadata;
}

namespace {

// Writes all of [data, data + size) to fd, retrying short writes and interrupts.
void write_all(int fd, const void* data, size_t size, const std::string& tmp_path) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(kOp, "path", tmp_path, "cannot be written: " + errno_text(errno));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
}

// Removes the temporary file unless the write was committed by renaming it.
struct TempFile {
  std::string path;
  int fd = -1;
  bool committed = false;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!committed) ::unlink(path.c_str());
  }
};

}  // namespace

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Validate everything before creating any file.
  std::set<std::string> seen;
  for (const auto& [name, view] : tensors) {
    if (name == kMetadataKey)
      fail(kOp, "name", name, "is reserved for the metadata block and cannot name a tensor");
    if (!seen.insert(name).second) fail(kOp, "name", name, "appears more than once");
    if (!view.device().is_cpu())
      fail(kOp, name + ".device", view.device().str(),
           "is not supported: only CPU tensors can be written to " + path);
    if (view.numel() > 0 && view.data() == nullptr)
      fail(kOp, name + ".data", "null", "has no memory for its " + view.shape_str() + " elements");
  }

  // The official layout: no gaps between tensors, and larger elements first so that every tensor
  // stays aligned to its element size once the buffer itself is 8-byte aligned.
  std::vector<const NamedTensor*> order;
  for (const NamedTensor& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
    return dtype_size(a->second.dtype()) > dtype_size(b->second.dtype());
  });

  std::string header;
  try {
    nlohmann::ordered_json json = nlohmann::ordered_json::object();
    if (!metadata.empty()) {
      nlohmann::ordered_json meta = nlohmann::ordered_json::object();
      for (const auto& [key, value] : metadata) meta[key] = value;
      json[kMetadataKey] = std::move(meta);
    }
    uint64_t offset = 0;
    for (const NamedTensor* t : order) {
      const TensorView& v = t->second;
      nlohmann::ordered_json entry;
      entry["dtype"] = std::string(safetensors_dtype_name(v.dtype()));
      entry["shape"] = std::vector<int64_t>(v.shape().begin(), v.shape().end());
      entry["data_offsets"] = {offset, offset + v.nbytes()};
      offset += v.nbytes();
      json[t->first] = std::move(entry);
    }
    header = json.dump();  // throws on names or metadata that are not valid UTF-8
  } catch (const nlohmann::json::exception& e) {
    fail(kOp, "path", path, std::string("cannot be written: the header is invalid: ") + e.what());
  }
  // Pad with spaces (valid JSON whitespace) so that the data buffer starts 8-byte aligned.
  header.append((8 - header.size() % 8) % 8, ' ');

  static std::atomic<uint64_t> counter{0};
  TempFile tmp;
  tmp.path = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (tmp.fd < 0) {
    const int err = errno;
    tmp.committed = true;  // we did not create it, so it is not ours to remove
    fail(kOp, "path", path,
         "cannot be written: creating " + tmp.path + " failed: " + errno_text(err));
  }

  unsigned char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(header.size() >> (8 * i));
  write_all(tmp.fd, length, sizeof(length), tmp.path);
  write_all(tmp.fd, header.data(), header.size(), tmp.path);
  for (const NamedTensor* t : order) {
    const TensorView& v = t->second;
    if (v.numel() == 0) continue;
    if (v.is_contiguous()) {
      write_all(tmp.fd, v.data(), v.nbytes(), tmp.path);
    } else {
      const Tensor packed = Tensor::copy_of(v, Device::cpu());
      write_all(tmp.fd, packed.data(), packed.nbytes(), tmp.path);
    }
  }
  // The data must be on disk before the rename publishes it, or a crash could leave a torn file.
  if (::fsync(tmp.fd) != 0) fail(kOp, "path", tmp.path, "cannot be flushed: " + errno_text(errno));
  const int fd = tmp.fd;
  tmp.fd = -1;
  if (::close(fd) != 0) fail(kOp, "path", tmp.path, "cannot be closed: " + errno_text(errno));
  if (::rename(tmp.path.c_str(), path.c_str()) != 0)
    fail(kOp, "path", path, "cannot be replaced: " + errno_text(errno));
  tmp.committed = true;
}

}  // namespace moekit
