"""The ``splatsem-data`` dataparser as nerfstudio's ``nerfstudio.dataparser_configs`` entry point names it.

nerfstudio imports this module while its own dataparser registry is still being built, so it may only
import the dataparser itself: importing trainer, pipeline or datamanager modules here gives a circular
import.
"""

from __future__ import annotations

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from splatsem_ns.data.dataparser import SplatsemDataParserConfig

splatsem_dataparser = DataParserSpecification(
    config=SplatsemDataParserConfig(),
    description="nerfstudio transforms.json data, validated before loading, with optional per-pixel "
    "semantic/instance labels, classes.json and a labelled point cloud (read without open3d).",
)
