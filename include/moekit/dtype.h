// Element types and exact conversions between them and f32.
// Narrowing conversions round to nearest even. FP8 follows spec/fp8.md: finite inputs saturate to
// +-max (e4m3fn: 448, e5m2: 57344) and never become NaN; NaN stays NaN; e4m3fn has no infinity so
// +-inf saturates to +-448, while e5m2 keeps +-inf.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace moekit {

enum class DType : uint8_t { f32, f16, bf16, f8e4m3, f8e5m2, i32, i64, u8 };

inline constexpr DType kAllDTypes[] = {DType::f32,    DType::f16, DType::bf16, DType::f8e4m3,
                                       DType::f8e5m2, DType::i32, DType::i64,  DType::u8};

size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);  // "f32", "bf16", ...
// Parses our names ("bf16") and safetensors names ("BF16", "F8_E4M3"); throws Error otherwise.
DType parse_dtype(std::string_view name);
std::string_view safetensors_dtype_name(DType dtype);  // "F32", "BF16", "F8_E4M3", ...
bool is_floating(DType dtype);

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16 widening is a shift; kept inline because every kernel's load path uses it.
inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float f8e4m3_to_f32(uint8_t b);
uint8_t f32_to_f8e4m3(float f);
float f8e5m2_to_f32(uint8_t b);
uint8_t f32_to_f8e5m2(float f);

// Reads element i of a floating buffer of the given dtype as f32 (f32/f16/bf16/f8 only).
float load_as_f32(const void* data, DType dtype, int64_t i);
// Writes f32 value v as element i (rounding/saturating as above).
void store_from_f32(void* data, DType dtype, int64_t i, float v);

}  // namespace moekit
