"""splatsem_ns: holistic semantic 3D Gaussian splatting for nerfstudio."""

__version__ = "0.1.0"
