"""``splatsem-viewer``: nerfstudio's ``ns-viewer``, listening on this machine only unless told otherwise.

``ns-viewer`` takes its viewer settings from its own command line, not from the run's saved config: it
replaces the config's ``viewer`` section with its ``--viewer.*`` options, whose address defaults to 0.0.0.0
(every network interface). So a method cannot make the saved config carry a safer default; this command
does, and is otherwise ``ns-viewer`` unchanged (same options, same viewer, same query panel)::

    splatsem-viewer --load-config outputs/.../config.yml                                  # on 127.0.0.1
    splatsem-viewer --load-config outputs/.../config.yml --viewer.websocket-host 0.0.0.0  # whole network
    splatsem-viewer --load-config SEMANTIC_SPLAT_RUN/config.yml --scene proc_000123 --context-views 3 7
                                                        # a semantic-splat prediction (viewer/prediction_view.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import tyro
from nerfstudio.scripts.viewer.run_viewer import RunViewer, ViewerConfigWithoutNumRays

from splatsem_ns.viewer import prediction_view
from splatsem_ns.viewer.address import LOOPBACK


@dataclass
class LoopbackRunViewer(RunViewer):
    """Load a checkpoint and start the viewer on 127.0.0.1 (``--viewer.websocket-host 0.0.0.0`` to share it)."""

    viewer: ViewerConfigWithoutNumRays = field(
        default_factory=lambda: ViewerConfigWithoutNumRays(websocket_host=LOOPBACK)
    )
    """Viewer configuration (listens on 127.0.0.1 by default)."""
    scene: Optional[str] = None
    """semantic-splat runs: the scene of the run's collection to predict and show (default: the first held-out
    scene)."""
    context_views: Tuple[int, ...] = ()
    """semantic-splat runs: the context view indices of that scene (default: the datamanager's choice)."""

    def main(self) -> None:
        prediction_view.REQUEST.update(scene=self.scene, context_views=tuple(self.context_views))
        super().main()


def main() -> None:
    """Entry point of ``splatsem-viewer`` (ns-viewer's own entry point, with this default)."""
    tyro.extras.set_accent_color("bright_yellow")
    tyro.cli(tyro.conf.FlagConversionOff[LoopbackRunViewer]).main()


if __name__ == "__main__":
    main()
