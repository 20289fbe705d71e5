// The FP8 CPU kernels on 8 lanes of AVX2 (with FMA and F16C). Compiled with -mavx2 -mfma -mf16c
// -mbmi2; called only when cpu_features().avx2.
#include "cpu/fp8_cpu_avx2.h"

#include "cpu/fp8_cpu_kernels.h"

namespace moekit::cpu {

void group_quant_avx2(const GroupQuantArgs& args) { run_group_quant<Avx2>(args); }
void block_gemm_avx2(const BlockGemmArgs& args) { run_block_gemm<Avx2>(args); }
void block_quantize_weight_avx2(const BlockQuantizeWeightArgs& args) {
  run_block_quantize_weight<Avx2>(args);
}
void gated_rows_avx2(const GatedRowsArgs& args) { run_gated_rows<Avx2>(args); }
void divide_to_e4m3_avx2(const float* x, int64_t n, float divisor, uint8_t* q) {
  WideRun<Avx2, Fp8Float::f32>::quantize(x, n, divisor, q);
}

}  // namespace moekit::cpu
