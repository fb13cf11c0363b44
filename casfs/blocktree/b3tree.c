/* BLAKE3 subtree chaining values: what the Python bindings of blake3 do not expose.
 *
 * A BLAKE3 digest is the root of a binary tree over 1 KiB chunks (left subtree = the largest
 * power of two of chunks that leaves at least one chunk on the right). Any aligned run of
 * 2^k chunks, and the tail after the last full run, is a subtree whose *chaining value* (CV)
 * depends only on its bytes and on the index of its first chunk. casfs keeps the CVs of a
 * chunk's fixed-size blocks (its "outboard"); merging them up the tree must give the chunk's
 * name, so one block is verified against the name by hashing only that block.
 *
 * Written from the BLAKE3 specification (compression function, flags, tree layout); checked in
 * tests against the blake3 package (the Rust implementation) on every root it can compute.
 * Portable C: the 8-way path is GCC/Clang vector extensions (AVX2 when built with it).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define CHUNK_LEN 1024
#define BLOCK_LEN 64
#define CHUNK_START 1u
#define CHUNK_END 2u
#define PARENT 4u
#define ROOT 8u

static const uint32_t IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                               0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline void store32(uint8_t *p, uint32_t w) {
    p[0] = (uint8_t)w; p[1] = (uint8_t)(w >> 8); p[2] = (uint8_t)(w >> 16); p[3] = (uint8_t)(w >> 24);
}

#define G(a, b, c, d, x, y)                 \
    do {                                    \
        a = a + b + (x); d = rotr(d ^ a, 16); \
        c = c + d; b = rotr(b ^ c, 12);       \
        a = a + b + (y); d = rotr(d ^ a, 8);  \
        c = c + d; b = rotr(b ^ c, 7);        \
    } while (0)

/* One compression; writes the 8-word output CV into cv (in place). */
static void compress(uint32_t cv[8], const uint8_t block[BLOCK_LEN], uint8_t block_len,
                     uint64_t counter, uint8_t flags) {
    uint32_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load32(block + 4 * i);
    for (int i = 0; i < 8; i++) v[i] = cv[i];
    v[8] = IV[0]; v[9] = IV[1]; v[10] = IV[2]; v[11] = IV[3];
    v[12] = (uint32_t)counter; v[13] = (uint32_t)(counter >> 32); v[14] = block_len; v[15] = flags;
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = SCHEDULE[r];
        G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) cv[i] = v[i] ^ v[i + 8];
}

/* CV of one chunk (1..1024 bytes; 0 only for the empty input) at chunk index ``counter``. */
static void chunk_cv(const uint8_t *data, size_t len, uint64_t counter, uint8_t flags_extra, uint32_t out[8]) {
    uint32_t cv[8];
    memcpy(cv, IV, sizeof cv);
    size_t nblocks = len ? (len + BLOCK_LEN - 1) / BLOCK_LEN : 1;
    for (size_t b = 0; b < nblocks; b++) {
        uint8_t buf[BLOCK_LEN];
        size_t off = b * BLOCK_LEN, n = len - off < BLOCK_LEN ? len - off : BLOCK_LEN;
        if (len == 0) n = 0;
        memset(buf, 0, sizeof buf);
        memcpy(buf, data + off, n);
        uint8_t flags = 0;
        if (b == 0) flags |= CHUNK_START;
        if (b == nblocks - 1) flags |= CHUNK_END | flags_extra;
        compress(cv, buf, (uint8_t)n, counter, flags);
    }
    memcpy(out, cv, sizeof cv);
}

#if defined(__GNUC__)
typedef uint32_t v8u __attribute__((vector_size(32)));
static inline v8u vrotr(v8u x, int n) { return (x >> n) | (x << (32 - n)); }
#define VG(a, b, c, d, x, y)                   \
    do {                                       \
        a = a + b + (x); d = vrotr(d ^ a, 16); \
        c = c + d; b = vrotr(b ^ c, 12);       \
        a = a + b + (y); d = vrotr(d ^ a, 8);  \
        c = c + d; b = vrotr(b ^ c, 7);        \
    } while (0)

/* CVs of 8 whole consecutive chunks (8 KiB at ``data``), chunk indexes counter..counter+7. */
static void chunk_cv8(const uint8_t *data, uint64_t counter, uint32_t out[8][8]) {
    v8u h[8], lo, hi;
    for (int i = 0; i < 8; i++) h[i] = (v8u){IV[i], IV[i], IV[i], IV[i], IV[i], IV[i], IV[i], IV[i]};
    for (int l = 0; l < 8; l++) { lo[l] = (uint32_t)(counter + l); hi[l] = (uint32_t)((counter + l) >> 32); }
    for (int b = 0; b < CHUNK_LEN / BLOCK_LEN; b++) {
        v8u m[16], v[16];
        for (int w = 0; w < 16; w++)
            for (int l = 0; l < 8; l++) m[w][l] = load32(data + (size_t)l * CHUNK_LEN + b * BLOCK_LEN + 4 * w);
        uint32_t flags = (b == 0 ? CHUNK_START : 0) | (b == 15 ? CHUNK_END : 0);
        for (int i = 0; i < 8; i++) v[i] = h[i];
        for (int i = 0; i < 4; i++) v[8 + i] = (v8u){IV[i], IV[i], IV[i], IV[i], IV[i], IV[i], IV[i], IV[i]};
        v[12] = lo; v[13] = hi;
        v[14] = (v8u){64, 64, 64, 64, 64, 64, 64, 64};
        v[15] = (v8u){flags, flags, flags, flags, flags, flags, flags, flags};
        for (int r = 0; r < 7; r++) {
            const uint8_t *s = SCHEDULE[r];
            VG(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
            VG(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
            VG(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
            VG(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
            VG(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
            VG(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
            VG(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
            VG(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
        }
        for (int i = 0; i < 8; i++) h[i] = v[i] ^ v[i + 8];
    }
    for (int l = 0; l < 8; l++)
        for (int i = 0; i < 8; i++) out[l][i] = h[i][l];
}
#endif

static void parent_words(const uint32_t l[8], const uint32_t r[8], int root, uint32_t out[8]) {
    uint8_t block[BLOCK_LEN];
    for (int i = 0; i < 8; i++) { store32(block + 4 * i, l[i]); store32(block + 32 + 4 * i, r[i]); }
    uint32_t cv[8];
    memcpy(cv, IV, sizeof cv);
    compress(cv, block, BLOCK_LEN, 0, (uint8_t)(PARENT | (root ? ROOT : 0)));
    memcpy(out, cv, sizeof cv);
}

static size_t largest_pow2_below(size_t n) { /* n >= 2 */
    size_t p = 1;
    while (p * 2 < n) p *= 2;
    return p;
}

/* Merge n >= 1 CVs (the leaves of one subtree, in order) with BLAKE3's left-heavy rule. */
static void merge(uint32_t (*cvs)[8], size_t n, int root, uint32_t out[8]) {
    if (n == 1) { memcpy(out, cvs[0], 32); return; }
    size_t left = largest_pow2_below(n);
    uint32_t l[8], r[8];
    merge(cvs, left, 0, l);
    merge(cvs + left, n - left, 0, r);
    parent_words(l, r, root, out);
}

/* Non-root CV of the subtree holding ``len`` bytes (>= 1) whose first chunk is ``chunk0``.
 * ``scratch`` holds ceil(len/1024) CVs. Returns 0, or -1 for an empty input. */
static int subtree(const uint8_t *data, size_t len, uint64_t chunk0, uint32_t (*scratch)[8], uint32_t out[8]) {
    if (len == 0) return -1;
    size_t n = (len + CHUNK_LEN - 1) / CHUNK_LEN, i = 0;
#if defined(__GNUC__)
    size_t whole = len / CHUNK_LEN;
    for (; i + 8 <= whole; i += 8) chunk_cv8(data + i * CHUNK_LEN, chunk0 + i, &scratch[i]);
#endif
    for (; i < n; i++) {
        size_t off = i * CHUNK_LEN, clen = len - off < CHUNK_LEN ? len - off : CHUNK_LEN;
        chunk_cv(data + off, clen, chunk0 + i, 0, scratch[i]);
    }
    merge(scratch, n, 0, out);
    return 0;
}

static void words_out(const uint32_t w[8], uint8_t out[32]) {
    for (int i = 0; i < 8; i++) store32(out + 4 * i, w[i]);
}
static void words_in(const uint8_t in[32], uint32_t w[8]) {
    for (int i = 0; i < 8; i++) w[i] = load32(in + 4 * i);
}

#define MAX_BLOCK (1u << 20)
#define MAX_CHUNKS_PER_BLOCK (MAX_BLOCK / CHUNK_LEN)

/* The CV of one block: ``len`` bytes (1..block) at block index ``index`` of size ``block``
 * (a power of two from 1 KiB to 1 MiB). Returns 0, or -1 on bad arguments. */
int casfs_b3_block_cv(const uint8_t *data, size_t len, size_t block, uint64_t index, uint8_t out[32]) {
    static __thread uint32_t scratch[MAX_CHUNKS_PER_BLOCK][8];
    if (block < CHUNK_LEN || block > MAX_BLOCK || (block & (block - 1)) || len == 0 || len > block) return -1;
    uint32_t cv[8];
    if (subtree(data, len, index * (block / CHUNK_LEN), scratch, cv)) return -1;
    words_out(cv, out);
    return 0;
}

/* The outboard of ``len`` bytes: the CVs of its ceil(len/block) blocks, 32 bytes each, into
 * ``out``. Only meaningful for len > block (a chunk of one block is verified whole). */
int casfs_b3_outboard(const uint8_t *data, size_t len, size_t block, uint8_t *out) {
    size_t n = (len + block - 1) / block;
    for (size_t b = 0; b < n; b++) {
        size_t off = b * block, blen = len - off < block ? len - off : block;
        if (casfs_b3_block_cv(data + off, blen, block, b, out + 32 * b)) return -1;
    }
    return 0;
}

/* The root hash (the chunk's name) from n >= 2 block CVs. Returns 0, or -1 for n < 2. */
int casfs_b3_root_from_cvs(const uint8_t *cvs, size_t n, uint8_t out[32]) {
    if (n < 2) return -1;
    /* merge iteratively over a small stack: leaves are consumed left to right like BLAKE3's
     * incremental hasher (a subtree is merged once the next leaf count makes it complete) */
    uint32_t stack[64][8];
    size_t depth = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cv[8];
        words_in(cvs + 32 * i, cv);
        if (i == n - 1) {
            /* finalize: merge right to left, the last merge is the root */
            while (depth > 0) {
                uint32_t p[8];
                parent_words(stack[depth - 1], cv, depth == 1, p);
                memcpy(cv, p, 32);
                depth--;
            }
            words_out(cv, out);
            return 0;
        }
        /* push, first merging complete subtrees: after i+1 leaves, merge once per trailing 0
         * bit of (i+1) */
        size_t total = i + 1;
        while ((total & 1) == 0) {
            uint32_t p[8];
            parent_words(stack[depth - 1], cv, 0, p);
            memcpy(cv, p, 32);
            depth--;
            total >>= 1;
        }
        memcpy(stack[depth++], cv, 32);
    }
    return -1;
}
