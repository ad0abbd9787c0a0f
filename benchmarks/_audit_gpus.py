"""GPU figures the kernel audit's bounds use: one table, every number with its source.

Per-SM limits are the same on H100 and H200 (one Hopper die, compute capability 9.0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int  # compute capability x 10
    sms: int
    clock_ghz: float  # boost clock the issue bound assumes
    hbm_tbs: float  # datasheet peak
    hbm_tbs_measured: float | None  # device-to-device copy measured on a lent machine, if any
    bf16_dense_tflops: float  # tensor-core dense bf16/fp16 with fp32 accumulate, datasheet
    mufu_per_sm_clk: int  # MUFU (ex2, lg2, rcp, ...) results per SM per clock
    issue_per_sm_clk: int  # warp instructions issued per SM per clock (one per scheduler)
    regs_per_sm: int
    max_regs_per_thread: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm_kb: int
    smem_per_block_kb: int
    sources: tuple[str, ...]

    @property
    def hbm_tbs_used(self) -> float:
        """What the roofline divides by: the measured copy bandwidth where there is one, else the datasheet."""
        return self.hbm_tbs_measured or self.hbm_tbs

    def to_json(self) -> dict:
        return dict(asdict(self), hbm_tbs_used=self.hbm_tbs_used)


_HOPPER_SOURCES = (
    "NVIDIA H100 Tensor Core GPU Architecture whitepaper (Hopper, 2022): 132 SMs (SXM5), 4 SM sub-partitions "
    "each with one warp scheduler issuing one warp instruction per clock, 64K 32-bit registers, 255 per thread, "
    "64 warps and 32 blocks per SM, 228 KB shared memory per SM (227 KB per block)",
    "CUDA C++ Programming Guide, arithmetic instruction throughput table, compute capability 9.0: 16 results "
    "per clock per SM for exp2/log2/reciprocal (MUFU)",
)

GPUS: dict[str, GPU] = {
    "H100": GPU(
        "H100 SXM5 80GB", 90, 132, 1.98, 3.35, None, 989.4, 16, 4, 65536, 255, 64, 32, 228, 227,
        _HOPPER_SOURCES + (
            "NVIDIA H100 datasheet (SXM): 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (1,979 with sparsity)",
            "boost clock 1,980 MHz: NVIDIA H100 SXM5 max boost clock, the clock nvidia-smi read under load on "
            "the lent H200 (same die)",
        )),
    "H200": GPU(
        "H200 SXM 141GB", 90, 132, 1.98, 4.8, 4.3, 989.4, 16, 4, 65536, 255, 64, 32, 228, 227,
        _HOPPER_SOURCES + (
            "NVIDIA H200 datasheet (SXM): 4.8 TB/s HBM3e, compute rates as H100 SXM (989 TFLOP/s dense BF16)",
            "measured here (/work/.library/device/KINDS.md, 2026-10-28 and 2026-11-04): 132 SMs reported by "
            "PyTorch, SM clock 1,980 MHz under load, device-to-device copy about 4.3 TB/s (bytes read + written)",
        )),
}

DEFAULT_GPU = "H200"


def occupancy(gpu: GPU, registers: int, warps: int, shared_bytes: int) -> dict:
    """Resident blocks and warps per SM for a kernel (registers per thread, warps per block, shared bytes).

    Registers are allocated per warp in units of 256 (8 per thread); 1 KB of shared memory per block is
    reserved by the system on sm_80+.
    """
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * warps)
    by_warps = gpu.max_warps_per_sm // warps
    smem = shared_bytes + 1024
    by_smem = (gpu.smem_per_sm_kb * 1024) // smem if shared_bytes <= gpu.smem_per_block_kb * 1024 else 0
    blocks = max(0, min(by_regs, by_warps, by_smem, gpu.max_blocks_per_sm))
    limiter = min((("registers", by_regs), ("warps", by_warps), ("shared memory", by_smem),
                   ("blocks", gpu.max_blocks_per_sm)), key=lambda kv: kv[1])[0]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, limited_by=limiter)
