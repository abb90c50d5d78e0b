"""Procedural indoor scenes at scale: thousands of labelled rooms for feed-forward models.

``splatsem-synthetic --out DIR --num-scenes N`` writes ``DIR/proc_000000`` ... (each an ordinary nerfstudio
dataset with exact depth, NYU40 class and instance labels and labelled points, as ``data/synthetic.py``'s single
room) and the collection index ``DIR/collection.json`` (``splatsem_ns.data.collection``).

Modules, in the order a scene is made:

- ``floorplan``: room shapes (rectangle, L-shape, two rooms joined by a doorway), wall segments, the floor grid;
- ``catalogue``: furniture composed of several primitives, with NYU40 class names;
- ``layout``: which objects each room type gets and where they go (no overlaps, walkable floor kept);
- ``cameras``: the hand-held camera walk;
- ``appearance``: textures (scikit-image photographs and procedural patterns), materials, lighting, shading;
- ``primitives``: boxes, cylinders and ellipsoids turned about z, ray cast with screen-space culling;
- ``scene``: one scene assembled, rendered and written;
- ``generate``: the collection (parallel workers, resume, index).
"""
