"""2D teachers: one interface (``Teacher``) over CLIP, SigLIP2, DINOv2/v3 and SAM, with named presets.

Importing this package is cheap: the model libraries load when a teacher is built.
"""

from splatsem_ns.teachers.base import Teacher, TeacherConfig, TeacherWeightsUnavailable
from splatsem_ns.teachers.dino_teacher import DINOTeacher, DINOTeacherConfig
from splatsem_ns.teachers.labels_teacher import LabelsTeacher, LabelsTeacherConfig
from splatsem_ns.teachers.open_clip_teacher import OpenCLIPTeacher, OpenCLIPTeacherConfig
from splatsem_ns.teachers.registry import (
    DEFAULT_TEACHERS,
    TINY_TEACHERS,
    available_teachers,
    make_teacher_config,
    register_teacher,
)
from splatsem_ns.teachers.sam_teacher import SAMTeacher, SAMTeacherConfig
from splatsem_ns.teachers.siglip_teacher import SigLIP2Teacher, SigLIP2TeacherConfig
from splatsem_ns.teachers.text_encoders import MiniLMTextEncoder, TextEncoder, make_text_encoder

__all__ = [
    "DEFAULT_TEACHERS",
    "DINOTeacher",
    "DINOTeacherConfig",
    "OpenCLIPTeacher",
    "OpenCLIPTeacherConfig",
    "SAMTeacher",
    "SAMTeacherConfig",
    "SigLIP2Teacher",
    "SigLIP2TeacherConfig",
    "TINY_TEACHERS",
    "Teacher",
    "TeacherConfig",
    "TeacherWeightsUnavailable",
    "available_teachers",
    "make_teacher_config",
    "register_teacher",
    "LabelsTeacher",
    "LabelsTeacherConfig",
    "MiniLMTextEncoder",
    "TextEncoder",
    "make_text_encoder",
]
