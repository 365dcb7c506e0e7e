// Attention dropout's counter-based hash, included inside `namespace fastbert::<isa>` by each kernels_*.cpp
// before its kernels (the AVX-512 micro-kernels use it too). No #include, no std::, as in kernels_impl.h.
//
// Bit for bit fastbert.reference.dropout_bits: three rounds of MurmurHash3's 32-bit finaliser over
// (seed, head), the packed query row and the key's index within its sequence, all mod 2^32 (uint32_t
// arithmetic wraps exactly like the reference's `& 0xFFFFFFFF`). A probability is kept iff its bits are
// >= threshold = floor(p * 2^32) (computed on the host in double, as the reference does).

static inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The first two rounds, shared by every key of one query row.
static inline uint32_t dropout_row_key(uint32_t seed, uint32_t head, uint32_t row) {
  return fmix32(fmix32(seed + head * 0x9E3779B9u) + row);
}

static inline uint32_t dropout_bits_of(uint32_t row_key, uint32_t col) { return fmix32(row_key + col); }

// s[j] = 0 for the dropped keys j < L of one row (kept ones unchanged: the caller folds 1 / (1 - p) into its
// normaliser). The loop vectorizes (32-bit multiplies and a compare-select).
static inline void dropout_row(float* s, int L, uint32_t row_key, uint32_t threshold) {
  for (int j = 0; j < L; ++j) s[j] = dropout_bits_of(row_key, static_cast<uint32_t>(j)) >= threshold ? s[j] : 0.f;
}
