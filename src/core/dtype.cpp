#include "moekit/dtype.h"

#include <algorithm>
#include <bit>
#include <string>

#include "moekit/error.h"

namespace moekit {

namespace {

struct DTypeInfo {
  DType dtype;
  size_t size;
  std::string_view name;
  std::string_view safetensors_name;
  bool floating;
};

constexpr DTypeInfo kInfos[] = {
    {DType::f32, 4, "f32", "F32", true},           {DType::f16, 2, "f16", "F16", true},
    {DType::bf16, 2, "bf16", "BF16", true},        {DType::f8e4m3, 1, "f8e4m3", "F8_E4M3", true},
    {DType::f8e5m2, 1, "f8e5m2", "F8_E5M2", true}, {DType::i32, 4, "i32", "I32", false},
    {DType::i64, 8, "i64", "I64", false},          {DType::u8, 1, "u8", "U8", false},
};

const DTypeInfo& info(DType dtype) {
  const auto index = static_cast<size_t>(dtype);
  // A value outside the enum can only come from a bad cast or corrupt memory; say so loudly.
  if (index >= std::size(kInfos)) {
    fail("dtype", "dtype", std::to_string(index), "is not a valid DType");
  }
  return kInfos[index];
}

constexpr uint32_t kF32SignMask = 0x80000000u;
constexpr uint32_t kF32AbsMask = 0x7fffffffu;
constexpr uint32_t kF32Inf = 0x7f800000u;
constexpr uint32_t kF32QuietNaN = 0x7fc00000u;

// Rounds a finite (or infinite) non-negative f32, given as bits, to nearest even in a binary format
// with E exponent bits and M mantissa bits, returning the magnitude encoding. The format is treated
// as having unbounded exponent range upwards: results past the largest encoding are left for the
// caller to clamp (to inf or to max), which is the only place the formats differ.
template <int E, int M>
uint32_t round_magnitude(uint32_t a) {
  constexpr int kBias = (1 << (E - 1)) - 1;
  constexpr uint32_t kRebias = static_cast<uint32_t>(127 - kBias) << 23;
  constexpr int kDrop = 23 - M;
  // f32 bits of the target's smallest normal, 2^(1 - kBias).
  constexpr uint32_t kMinNormal = static_cast<uint32_t>(127 - kBias + 1) << 23;
  if (a >= kMinNormal) {
    // Normal in the target: rebias the exponent and round the low kDrop bits away. A mantissa
    // carry propagates into the exponent field, which is exactly the right result.
    const uint32_t r = a - kRebias;
    return (r + ((1u << (kDrop - 1)) - 1) + ((r >> kDrop) & 1u)) >> kDrop;
  }
  // Subnormal (or zero) in the target: the result is significand * 2^(e - 150) in units of the
  // target's subnormal step 2^(1 - kBias - M). f32 subnormals behave like exponent 1.
  const int e = static_cast<int>(a >> 23);
  const uint32_t sig = e != 0 ? ((a & 0x7fffffu) | 0x800000u) : a;
  constexpr int kShiftBase = (127 - kBias) + kDrop + 1;
  // sig < 2^24, so any shift >= 25 already rounds to zero; 31 keeps the arithmetic in range.
  const int shift = std::min(kShiftBase - std::max(e, 1), 31);
  return (sig + ((1u << (shift - 1)) - 1) + ((sig >> shift) & 1u)) >> shift;
}

// Widens the magnitude encoding of a finite value in an (E, M) format to f32 bits. Exact.
template <int E, int M>
uint32_t widen_magnitude(uint32_t mag) {
  constexpr int kBias = (1 << (E - 1)) - 1;
  constexpr uint32_t kManMask = (1u << M) - 1;
  const uint32_t exp = mag >> M;
  uint32_t man = mag & kManMask;
  if (exp != 0) return ((exp + 127 - kBias) << 23) | (man << (23 - M));
  if (man == 0) return 0;
  // Subnormal: normalise so the leading one becomes the implicit bit.
  const int shift = std::countl_zero(man) - (31 - M);
  man = (man << shift) & kManMask;
  return (static_cast<uint32_t>(127 - kBias + 1 - shift) << 23) | (man << (23 - M));
}

}  // namespace

size_t dtype_size(DType dtype) { return info(dtype).size; }

std::string_view dtype_name(DType dtype) { return info(dtype).name; }

std::string_view safetensors_dtype_name(DType dtype) { return info(dtype).safetensors_name; }

bool is_floating(DType dtype) { return info(dtype).floating; }

DType parse_dtype(std::string_view name) {
  for (const DTypeInfo& i : kInfos) {
    if (name == i.name || name == i.safetensors_name) return i.dtype;
  }
  fail("dtype", "name", std::string(name),
       "is not a known dtype (expected f32, f16, bf16, f8e4m3, f8e5m2, i32, i64, u8 or the "
       "safetensors names F32, F16, BF16, F8_E4M3, F8_E5M2, I32, I64, U8)");
}

uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  // Round to nearest even on the dropped 16 bits; finite overflow correctly carries into inf.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // NaN keeps sign and top payload bits, with the quiet bit forced so it cannot turn into inf.
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & kF32AbsMask) > kF32Inf ? nan : rounded);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  if (mag >= 0x7c00u) {
    const uint32_t man = mag & 0x3ffu;
    // inf stays inf; NaN keeps its payload and is made quiet.
    return f32_from_bits(sign | kF32Inf | (man << 13) | (man != 0 ? 0x400000u : 0u));
  }
  return f32_from_bits(sign | widen_magnitude<5, 10>(mag));
}

uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u & kF32SignMask) >> 16;
  const uint32_t a = u & kF32AbsMask;
  if (a > kF32Inf) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  // Overflow (and inf) lands on or past the inf encoding; clamp it there.
  return static_cast<uint16_t>(sign | std::min(round_magnitude<5, 10>(a), 0x7c00u));
}

float f8e4m3_to_f32(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t mag = b & 0x7fu;
  // e4m3fn: only S.1111.111 is NaN; exponent 15 is otherwise an ordinary binade (up to 448).
  if (mag == 0x7fu) return f32_from_bits(sign | kF32QuietNaN);
  return f32_from_bits(sign | widen_magnitude<4, 3>(mag));
}

uint8_t f32_to_f8e4m3(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u & kF32SignMask) >> 24;
  const uint32_t a = u & kF32AbsMask;
  if (a > kF32Inf) return static_cast<uint8_t>(sign | 0x7fu);
  // No inf in e4m3fn: everything past 448 (inf included) saturates to 0x7e.
  return static_cast<uint8_t>(sign | std::min(round_magnitude<4, 3>(a), 0x7eu));
}

float f8e5m2_to_f32(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t mag = b & 0x7fu;
  if (mag >= 0x7cu) {
    const uint32_t man = mag & 0x3u;
    return f32_from_bits(sign | kF32Inf | (man << 21) | (man != 0 ? 0x400000u : 0u));
  }
  return f32_from_bits(sign | widen_magnitude<5, 2>(mag));
}

uint8_t f32_to_f8e5m2(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u & kF32SignMask) >> 24;
  const uint32_t a = u & kF32AbsMask;
  if (a > kF32Inf) return static_cast<uint8_t>(sign | 0x7eu | ((a >> 21) & 0x3u));
  if (a == kF32Inf) return static_cast<uint8_t>(sign | 0x7cu);
  // Finite values saturate to 57344 (0x7b) instead of rounding up to inf.
  return static_cast<uint8_t>(sign | std::min(round_magnitude<5, 2>(a), 0x7bu));
}

float load_as_f32(const void* data, DType dtype, int64_t i) {
  // memcpy: buffers of narrow types are not guaranteed to be aligned for wider loads.
  const auto* p = static_cast<const unsigned char*>(data);
  switch (dtype) {
    case DType::f32: {
      float v;
      std::memcpy(&v, p + i * 4, 4);
      return v;
    }
    case DType::f16: {
      uint16_t h;
      std::memcpy(&h, p + i * 2, 2);
      return f16_to_f32(h);
    }
    case DType::bf16: {
      uint16_t h;
      std::memcpy(&h, p + i * 2, 2);
      return bf16_to_f32(h);
    }
    case DType::f8e4m3:
      return f8e4m3_to_f32(p[i]);
    case DType::f8e5m2:
      return f8e5m2_to_f32(p[i]);
    default:
      break;
  }
  fail("load_as_f32", "dtype", std::string(dtype_name(dtype)), "is not a floating dtype");
}

void store_from_f32(void* data, DType dtype, int64_t i, float v) {
  auto* p = static_cast<unsigned char*>(data);
  switch (dtype) {
    case DType::f32:
      std::memcpy(p + i * 4, &v, 4);
      return;
    case DType::f16: {
      const uint16_t h = f32_to_f16(v);
      std::memcpy(p + i * 2, &h, 2);
      return;
    }
    case DType::bf16: {
      const uint16_t h = f32_to_bf16(v);
      std::memcpy(p + i * 2, &h, 2);
      return;
    }
    case DType::f8e4m3:
      p[i] = f32_to_f8e4m3(v);
      return;
    case DType::f8e5m2:
      p[i] = f32_to_f8e5m2(v);
      return;
    default:
      break;
  }
  fail("store_from_f32", "dtype", std::string(dtype_name(dtype)), "is not a floating dtype");
}

}  // namespace moekit
