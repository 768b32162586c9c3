#!/usr/bin/env python3
"""Checks the shared-memory addressing of kernels/flash_wgmma_sm90a.cu without a GPU.

For every wgmma operand of the attention kernels, the element the hardware reads through the
kernel's descriptor (start address, LBO, SBO, 128-byte swizzle), by the PTX ISA's canonical
layouts ("Shared Memory Matrix Layout": K-major ((8,m),(T,2k)):((8T,SBO),(1,T)), MN-major
((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), Swizzle<3,4,3> on the byte address), must be the element
load_sw128 (or the backward's dS^T stores) put there. The offsets below restate the kernel's;
change both together. Prints one line per operand; exits 1 on any mismatch.

    python3 scripts/cuda/wgmma_layout_model.py

This checks the arithmetic against the documented layouts, not the hardware: `wgmma_probe` in
`omr bench kernels` does that on a GPU.
"""
import sys

FAILED = []
def swz(a): return a ^ (((a >> 7) & 7) << 4)
def kmajor(start, sbo, r, k):  # r: M/N index, k: 0..15
    r0, r1, k0, k1 = r % 8, r // 8, k % 8, k // 8
    return swz(start + 2 * (r0 * 64 + k0 + 8 * k1) + r1 * sbo)
def mnmajor(start, lbo, sbo, n, k):
    n0, n1, n2, k0, k1 = n % 8, (n // 8) % 8, n // 64, k % 8, k // 8
    return swz(start + 2 * (n0 + 8 * n1 + 64 * k0) + n2 * lbo + k1 * sbo)
def stored(base, R, row, col):  # byte address of element (row, col) of an R-row tile
    return base + (col // 64) * R * 128 + row * 128 + (((col % 64) // 8) ^ (row % 8)) * 16 + (col % 8) * 2
def check(name, pairs):
    bad = sum(1 for want, got in pairs if want != got)
    print(f"{name}: {len(pairs)} elements, {bad} mismatched")
    if bad:
        FAILED.append(name)
SBO = 1024
B0 = 0x10000  # a 1024-aligned base
# forward S = Q K^T: A = Q rows wg*64.., R=128; B = K tile R=128
for wg in (0, 1):
    pairs = []
    for kk in range(8):
        sa = B0 + 2 * ((kk // 4) * 128 * 64 + wg * 64 * 64 + (kk % 4) * 16)
        sb = B0 + 0x8000 + 2 * ((kk // 4) * 128 * 64 + (kk % 4) * 16)
        for m in range(64):
            for k in range(16):
                pairs.append((stored(B0, 128, wg * 64 + m, 16 * kk + k), kmajor(sa, SBO, m, k)))
        for n in range(128):
            for k in range(16):
                pairs.append((stored(B0 + 0x8000, 128, n, 16 * kk + k), kmajor(sb, SBO, n, k)))
    check(f"fwd S wg{wg}", pairs)
# forward O += P V: B = V tile R=128 MN-major, LBO = 128*128
pairs = []
for kk in range(8):
    sb = B0 + 2 * (kk * 16 * 64)
    for n in range(128):
        for k in range(16):
            pairs.append((stored(B0, 128, 16 * kk + k, n), mnmajor(sb, 128 * 128, SBO, n, k)))
check("fwd O", pairs)
# backward S^T = K Q^T: A = K rows wg*64.. (R=128), B = Q tile R=64
for wg in (0, 1):
    pairs = []
    for kk in range(8):
        sa = B0 + 2 * (wg * 64 * 64 + (kk // 4) * 128 * 64 + (kk % 4) * 16)
        sb = B0 + 0x8000 + 2 * ((kk // 4) * 64 * 64 + (kk % 4) * 16)
        for m in range(64):
            for k in range(16):
                pairs.append((stored(B0, 128, wg * 64 + m, 16 * kk + k), kmajor(sa, SBO, m, k)))
        for n in range(64):
            for k in range(16):
                pairs.append((stored(B0 + 0x8000, 64, n, 16 * kk + k), kmajor(sb, SBO, n, k)))
    check(f"bwd S^T wg{wg}", pairs)
# backward dV += P^T dO: B = dO tile R=64 MN-major, LBO = 64*128
pairs = []
for kk in range(4):
    sb = B0 + 2 * (kk * 16 * 64)
    for n in range(128):
        for k in range(16):
            pairs.append((stored(B0, 64, 16 * kk + k, n), mnmajor(sb, 64 * 128, SBO, n, k)))
check("bwd dV/dK", pairs)
# backward dQ = dS K: A[m][k] = dS^T[16kk+k][m] (R=128, 64 cols, M-major); B[k][n] = K[16kk+k][wg*64+n]
for wg in (0, 1):
    pairs = []
    for kk in range(8):
        sa = B0 + 2 * (kk * 16 * 64)
        sb = B0 + 0x8000 + 2 * (wg * 128 * 64 + kk * 16 * 64)
        for m in range(64):
            for k in range(16):
                pairs.append((stored(B0, 128, 16 * kk + k, m), mnmajor(sa, 128 * 128, SBO, m, k)))
        for n in range(64):
            for k in range(16):
                pairs.append((stored(B0 + 0x8000, 128, 16 * kk + k, wg * 64 + n), mnmajor(sb, 128 * 128, SBO, n, k)))
    check(f"bwd dQ wg{wg}", pairs)
# the dS^T stores: thread (wl, g, t), fragment kk, element → stored position
pairs = []
for wg in (0, 1):
    for wl in range(4):
        for g in range(8):
            for t in range(4):
                for kk in range(4):
                    r0 = wg * 64 + wl * 16 + g
                    for (r, n) in ((r0, 2 * kk), (r0 + 8, 2 * kk), (r0, 2 * kk + 1), (r0 + 8, 2 * kk + 1)):
                        got = B0 + 2 * (r * 64 + 2 * t) + 4 * ((((n) ^ (r % 8)) * 8) // 2)
                        col = 8 * n + 2 * t
                        pairs.append((stored(B0, 128, r, col), got))
check("bwd dS^T stores", pairs)
sys.exit(1 if FAILED else 0)
