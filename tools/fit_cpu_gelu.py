"""Fits the polynomials of the native CPU kernel's GELU (`nn_blocksparse/cpu/block_sparse_linear.cpp`).

    python tools/fit_cpu_gelu.py        # needs mpmath and numpy

erf(z) = z * P(z^2) on |z| <= 1 (P of degree 5) and erfc(z) = Q(z - 2.46) on [1, 3.92] (Q of degree
12; erf rounds to 1 in fp32 beyond 3.92). Each is a least-squares fit on Chebyshev nodes, reweighted
towards minimax (Lawson), relative error for P and absolute for Q. Prints the coefficients rounded
to fp32, as the kernel holds them, and the worst absolute error of erf evaluated with them in fp32
(fused multiply-adds, as the kernel does) over a dense grid: about 1e-7, the rounding of z itself.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 30
SPLIT, CLAMP = 1.0, 3.92
CENTER = (SPLIT + CLAMP) / 2
f32 = np.float32


def fit(function, low: float, high: float, degree: int, center: float = 0.0, relative: bool = False):
    nodes = 800
    x = np.array([(low + high) / 2 + (high - low) / 2 * np.cos(np.pi * (i + 0.5) / nodes) for i in range(nodes)])
    y = np.array([float(function(mp.mpf(v))) for v in x])
    basis = np.vander(x - center, degree + 1, increasing=True)
    weight = 1 / np.abs(y) if relative else np.ones_like(y)
    for _ in range(15):
        coefficients = np.linalg.lstsq(basis * weight[:, None], y * weight, rcond=None)[0]
        error = (basis @ coefficients - y) * (1 / np.abs(y) if relative else 1)
        weight = weight * (np.abs(error) + 1e-30) ** 0.3
        weight /= weight.max()
    return [f32(c) for c in coefficients]


def horner(coefficients, t):
    result = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = f32(np.float64(result) * np.float64(t) + np.float64(c))  # one rounding: a fused multiply-add
    return result


def main() -> None:
    small = fit(lambda t: mp.erf(mp.sqrt(t)) / mp.sqrt(t) if t > 0 else 2 / mp.sqrt(mp.pi), 0, SPLIT**2, 5,
                relative=True)
    large = fit(mp.erfc, SPLIT, CLAMP, 12, center=CENTER)
    worst = 0.0
    for z in np.linspace(0, 4.2, 40001).astype(np.float32):
        if z <= SPLIT:
            erf = z * horner(small, f32(z * z))
        else:
            erf = f32(1) - horner(large, f32(min(z, f32(CLAMP)) - f32(CENTER)))
        worst = max(worst, abs(float(erf) - float(mp.erf(mp.mpf(float(z))))))
    print("erf_small =", ", ".join(f"{float(c)!r}f" for c in small))
    print("erfc_large =", ", ".join(f"{float(c)!r}f" for c in large), f"(argument |z| - {CENTER})")
    print(f"worst absolute error of erf in fp32: {worst:.2e}")


if __name__ == "__main__":
    main()
