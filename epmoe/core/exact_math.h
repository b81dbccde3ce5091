// Transcendentals written with explicit fmaf and IEEE-rounded + - * /, so the CPU reference and
// the CUDA kernels compute bitwise the same value (library expf differs by an ulp between glibc
// and CUDA, which would let a near-tie pick different experts). Max error ~1 ulp over the range.
#pragma once

#include <cmath>

#include "epmoe/core/hd.h"

namespace epmoe {

// exp(x) for finite x; saturates to 0 below -104 and to +inf above 88.7.
EPMOE_HD float exact_expf(float x) {
  if (x < -104.0f) return 0.0f;
  if (x > 88.72f) return INFINITY;
  // x = n*ln2 + r, |r| <= ln2/2, ln2 split in a head exact in float and a tail.
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, x);
  r = fmaf(n, -1.428606765330187045e-06f, r);
  // Taylor/minimax polynomial of exp(r) on [-ln2/2, ln2/2], Horner with fma.
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r);  // r + r^2 * q(r)
  p = p + 1.0f;
  return ldexpf(p, int(n));
}

EPMOE_HD float exact_sigmoidf(float x) { return 1.0f / (1.0f + exact_expf(-x)); }

// SiLU(g) * u as both backends compute it: g / (1 + exp(-g)) * u.
EPMOE_HD float exact_silu_mul(float g, float u) { return g / (1.0f + exact_expf(-g)) * u; }

}  // namespace epmoe
