"""`rankscope bench`'s bf16 peak: the Hopper variant (SXM, PCIe, NVL) read from the CUDA device name,
each with its own data-sheet peak."""

from __future__ import annotations

import pytest

from rankscope.run.bench import bf16_peak, hopper_variant


@pytest.mark.parametrize(
    ("name", "variant", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "SXM", 989),  # the SXM part's name carries no form factor
        ("NVIDIA H100 PCIe", "PCIe", 756),
        ("NVIDIA H100 NVL", "NVL", 835),
        ("NVIDIA H200", "SXM", 989),
        ("NVIDIA H200 NVL", "NVL", 835),
        ("NVIDIA H800 PCIe", "PCIe", 756),
    ],
)
def test_the_hopper_variant_and_its_peak_come_from_the_device_name(name, variant, tflops):
    assert hopper_variant(name) == variant
    assert bf16_peak(name) == tflops * 1e12


def test_other_names_keep_their_peak_and_unknown_ones_have_none():
    assert bf16_peak("NVIDIA GH200 480GB") == 989e12  # the superchip, not read as an H200
    assert bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak("NVIDIA L40S") == 362e12 and bf16_peak("NVIDIA L4") == 121e12
    assert bf16_peak("NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None  # a slice of the card's SMs
    assert bf16_peak("NVIDIA H200 PCIe") is None  # no such part: no guessed peak
    assert bf16_peak("Tesla T4") is None
