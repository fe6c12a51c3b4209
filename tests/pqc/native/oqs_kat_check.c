/* A Python-free check of a (cross-built) liboqs: prints the library version, then for a
 * FIPS 203 seed (d || z, 64 bytes hex) the ML-KEM-768 encapsulation key, and for a FIPS 204
 * seed (xi, 32 bytes hex) the ML-DSA-65 public key; then a random ML-KEM round trip and an
 * ML-DSA sign/verify. tests/pqc/test_liboqs.py compares the keys with the known-answer files.
 * Output: "version <v>\nek <hex>\npk <hex>\nroundtrip ok\n"; exit status 1 on any failure. */
#include <oqs/oqs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint8_t fixed[64];
static size_t fixed_len, fixed_pos;

/* ML-DSA key generation draws xi with one randombytes call: serve it from the seed. */
static void fixed_random(uint8_t *out, size_t n) {
    if (fixed_pos + n > fixed_len) { fprintf(stderr, "seed exhausted\n"); exit(1); }
    memcpy(out, fixed + fixed_pos, n);
    fixed_pos += n;
}

static size_t unhex(const char *hex, uint8_t *out, size_t max) {
    size_t n = strlen(hex) / 2;
    if (n > max) n = max;
    for (size_t i = 0; i < n; i++) sscanf(hex + 2 * i, "%2hhx", &out[i]);
    return n;
}

static void print_hex(const char *label, const uint8_t *b, size_t n) {
    printf("%s ", label);
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s KEM_SEED_HEX DSA_SEED_HEX\n", argv[0]); return 2; }
    OQS_init();
    printf("version %s\n", OQS_version());
    OQS_KEM *kem = OQS_KEM_new(OQS_KEM_alg_ml_kem_768);
    OQS_SIG *sig = OQS_SIG_new(OQS_SIG_alg_ml_dsa_65);
    if (!kem || !sig) { fprintf(stderr, "algorithm missing\n"); return 1; }
    uint8_t seed[64], pk[4096], sk[8192], ct[2048], ss1[32], ss2[32], s[8192];
    size_t slen = 0;
    if (unhex(argv[1], seed, 64) != 64) return 2;
    if (OQS_KEM_keypair_derand(kem, pk, sk, seed) != OQS_SUCCESS) return 1;
    print_hex("ek", pk, kem->length_public_key);
    fixed_len = unhex(argv[2], fixed, 32);
    fixed_pos = 0;
    OQS_randombytes_custom_algorithm(fixed_random);
    if (OQS_SIG_keypair(sig, pk, sk) != OQS_SUCCESS || fixed_pos != 32) return 1;
    OQS_randombytes_switch_algorithm(OQS_RAND_alg_system);
    print_hex("pk", pk, sig->length_public_key);
    const uint8_t msg[] = "pqfed";
    if (OQS_SIG_sign(sig, s, &slen, msg, sizeof msg, sk) != OQS_SUCCESS) return 1;
    if (OQS_SIG_verify(sig, msg, sizeof msg, s, slen, pk) != OQS_SUCCESS) return 1;
    s[0] ^= 1;
    if (OQS_SIG_verify(sig, msg, sizeof msg, s, slen, pk) == OQS_SUCCESS) return 1;
    if (OQS_KEM_keypair(kem, pk, sk) != OQS_SUCCESS) return 1;
    if (OQS_KEM_encaps(kem, ct, ss1, pk) != OQS_SUCCESS) return 1;
    if (OQS_KEM_decaps(kem, ss2, ct, sk) != OQS_SUCCESS || memcmp(ss1, ss2, 32) != 0) return 1;
    printf("roundtrip ok\n");
    OQS_KEM_free(kem);
    OQS_SIG_free(sig);
    return 0;
}
