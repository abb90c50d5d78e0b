"""Compact scene tokens: K (position, feature) pairs that summarise a semantic Gaussian scene.

    splatsem-tokens exports/scene.ply --tokens 512 --output exports/scene.tokens.npz [--teachers siglip2]

A language model takes a few hundred tokens, not a million Gaussians. The tokens are placed by farthest-point
sampling of the (visible) Gaussians' centres, so they cover the scene evenly whatever its density; each token pools
the Gaussians nearest to it (opacity-weighted mean of their latents, centre of mass as its position). Tokens stay in
the scene's latent space, so the scene's projector heads decode them (``--teachers`` also stores each teacher's
decoded feature per token), and per-Gaussian latents can be decoded back from them (inverse-distance weights of the
nearest tokens), which keeps a token-compressed scene queryable.

With ``--checkpoint`` (a chorus-pretrain run) the tokens come from the encoder's coarsest stage instead: one per
coarsest-stage site, the sites holding the most opacity, each with that stage's feature beside its pooled latent
(``encoder_tokens``).

Any semantic scene works: a chorus-splat export, a semantic-splat prediction, or a scene encoded by the Chorus
encoder (``splatsem-encode``). Tokens are written as .npz or .safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import tyro
from jaxtyping import Float, Int
from scipy.spatial import cKDTree
from torch import Tensor

from splatsem_ns.export.loader import SemanticScene, load_semantic_scene
from splatsem_ns.files import write_atomically

FORMAT = "splatsem_ns.scene_tokens"
FORMAT_VERSION = 1


@dataclass
class SceneTokens:
    """K tokens of a scene."""

    positions: Float[Tensor, "K 3"]
    """Each token's centre (opacity-weighted mean of its Gaussians' centres), in the scene's frame."""
    latent: Float[Tensor, "K D"]
    """Each token's latent (opacity-weighted mean of its Gaussians' latents): decodable by the scene's heads."""
    counts: Int[Tensor, " K"]
    """Gaussians pooled into each token."""
    features: Dict[str, Float[Tensor, "K C"]] = field(default_factory=dict)
    """Decoded teacher features per token, by teacher (only those asked for)."""
    encoder_features: Optional[Float[Tensor, "K E"]] = None
    """With tokens of the Chorus encoder's coarsest stage (``encoder_tokens``): that stage's feature of the site
    each token stands for (the encoder's most global description of that part of the scene)."""

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def decode_latent(self, means: Float[Tensor, "N 3"], neighbours: int = 3) -> Float[Tensor, "N D"]:
        """Per-Gaussian latents from the tokens: inverse-distance weights of the ``neighbours`` nearest tokens."""
        k = min(neighbours, self.num_tokens)
        distances, index = cKDTree(self.positions.double().numpy()).query(means.double().cpu().numpy(), k=k)
        distances = torch.as_tensor(distances, dtype=torch.float32).reshape(len(means), k)
        index = torch.as_tensor(index, dtype=torch.long).reshape(len(means), k)
        weights = 1.0 / distances.clamp_min(1e-6)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return (self.latent[index] * weights[..., None]).sum(dim=1)

    def save(self, path: Union[str, Path]) -> Path:
        """Write as .npz or .safetensors (by the suffix), atomically."""
        path = Path(path)
        arrays = {"positions": self.positions, "latent": self.latent, "counts": self.counts}
        arrays.update({f"feature.{name}": value for name, value in self.features.items()})
        if self.encoder_features is not None:
            arrays["encoder_features"] = self.encoder_features
        arrays = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            data = save(arrays, metadata=metadata)
        elif path.suffix == ".npz":
            import io

            buffer = io.BytesIO()
            np.savez(
                buffer,
                **{k: v.numpy() for k, v in arrays.items()},
                **{f"meta.{k}": v for k, v in metadata.items()},
            )
            data = buffer.getvalue()
        else:
            raise ValueError(
                f"scene tokens are written as .npz or .safetensors, not {path.suffix!r} ({path})"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda stream: stream.write(data))
        return path


def load_scene_tokens(path: Union[str, Path]) -> SceneTokens:
    """Read tokens written by ``SceneTokens.save``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        else:
            with np.load(path, allow_pickle=False) as npz:
                metadata = {k[len("meta.") :]: str(npz[k]) for k in npz.files if k.startswith("meta.")}
                arrays = {k: torch.from_numpy(npz[k]) for k in npz.files if not k.startswith("meta.")}
    except FileNotFoundError:
        raise
    except Exception as err:  # numpy, zipfile and safetensors raise several types for broken files
        raise ValueError(f"{path} is not a scene-token file written by splatsem-tokens ({err})") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a scene-token file written by splatsem-tokens")
    return SceneTokens(
        positions=arrays["positions"],
        latent=arrays["latent"],
        counts=arrays["counts"],
        features={k[len("feature.") :]: v for k, v in arrays.items() if k.startswith("feature.")},
        encoder_features=arrays.get("encoder_features"),
    )


def farthest_points(points: Float[Tensor, "N 3"], k: int, seed: int = 0) -> Int[Tensor, " K"]:
    """Indices of ``k`` farthest-point samples of ``points`` (starting from a seeded random point)."""
    n = len(points)
    if k >= n:
        return torch.arange(n)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    nearest = torch.full((n,), float("inf"))
    for i in range(1, k):
        nearest = torch.minimum(nearest, ((points - points[chosen[i - 1]]) ** 2).sum(dim=1))
        chosen[i] = int(nearest.argmax())
    return chosen


def scene_tokens(
    scene: SemanticScene,
    num_tokens: int = 512,
    min_opacity: float = 0.05,
    max_candidates: int = 200_000,
    teachers: Sequence[str] = (),
    seed: int = 0,
) -> SceneTokens:
    """``num_tokens`` tokens of ``scene`` (see the module docstring). Gaussians below ``min_opacity`` are left out;
    at most ``max_candidates`` Gaussians (a seeded subset) are candidates for the sampling."""
    if scene.latent is None:
        raise ValueError(f"{scene.source or 'the scene'} has no semantic latent to make tokens of")
    visible, weight = _visible(scene, min_opacity)
    means = scene.means.float()[visible].cpu()
    candidates = torch.arange(len(visible))
    if len(candidates) > max_candidates:
        candidates = torch.randperm(len(visible), generator=torch.Generator().manual_seed(seed))[
            :max_candidates
        ]
    centres = means[candidates[farthest_points(means[candidates], num_tokens, seed)]]
    _, owner = cKDTree(centres.double().numpy()).query(means.double().numpy(), k=1)
    owner = torch.as_tensor(owner, dtype=torch.long)
    latent = scene.latent.float()[visible].cpu()
    return _pooled(scene, means, latent, weight, owner, len(centres), teachers)


def encoder_tokens(
    scene: SemanticScene,
    encoder,
    num_tokens: int = 512,
    min_opacity: float = 0.05,
    teachers: Sequence[str] = (),
) -> SceneTokens:
    """Tokens from the Chorus encoder's coarsest stage: one token per coarsest-stage site (a voxel 16 times the
    encoder's for SpUNet-v1, 8 times for PTv3-lite-v1: 32 or 16 cm at the default 2 cm), the ``num_tokens`` sites
    that hold the most opacity. Each carries that stage's feature (``encoder_features``), and, like
    ``scene_tokens``' tokens, the opacity-weighted mean centre and latent of its Gaussians, so the scene's heads still
    decode it and per-Gaussian latents decode back from the tokens (Gaussians of the sites left out take their
    nearest tokens'). ``encoder``: a ``GaussianEncoder`` whose latents the scene's heads decode (the chorus-pretrain
    run ``splatsem-encode`` used)."""
    visible, weight = _visible(scene, min_opacity)
    device = next(encoder.parameters()).device
    stage = encoder.coarsest_stage(
        *(
            getattr(scene, k).float()[visible].to(device)
            for k in ("means", "features_dc", "opacities", "scales", "quats")
        )
    )
    site = stage.site.cpu()
    sites = len(stage.centres)
    mass = torch.zeros(sites).index_add_(0, site, weight)
    keep = torch.argsort(mass, descending=True)[: min(num_tokens, sites)]
    token_of_site = torch.full((sites,), -1, dtype=torch.long)
    token_of_site[keep] = torch.arange(len(keep))
    owner = token_of_site[site]
    mine = owner >= 0  # Gaussians of the kept sites
    means = scene.means.float()[visible].cpu()[mine]
    tokens = _pooled(scene, means, stage.latent.cpu()[mine], weight[mine], owner[mine], len(keep), teachers)
    tokens.encoder_features = stage.features[keep.to(stage.features.device)].cpu()
    return tokens


def _visible(scene: SemanticScene, min_opacity: float) -> Tuple[Int[Tensor, " M"], Float[Tensor, " M"]]:
    """Indices of the Gaussians at or above ``min_opacity``, and their opacities (CPU)."""
    opacity = torch.sigmoid(scene.opacities.float().reshape(-1)).cpu()
    visible = torch.nonzero(opacity >= min_opacity).flatten()
    if len(visible) == 0:
        raise ValueError(f"no Gaussian of {scene.source or 'the scene'} is above opacity {min_opacity}")
    return visible, opacity[visible]


def _pooled(
    scene: SemanticScene,
    means: Float[Tensor, "M 3"],
    latent: Float[Tensor, "M D"],
    weight: Float[Tensor, " M"],
    owner: Int[Tensor, " M"],
    k: int,
    teachers: Sequence[str],
) -> SceneTokens:
    """``k`` tokens, each the ``weight``-weighted mean centre and latent of the Gaussians ``owner`` gives it, with
    the decoded features of ``teachers`` (by the scene's heads)."""
    total = torch.zeros(k).index_add_(0, owner, weight).clamp_min(1e-12)
    positions = torch.zeros(k, 3).index_add_(0, owner, means * weight[:, None]) / total[:, None]
    pooled = torch.zeros(k, latent.shape[1]).index_add_(0, owner, latent * weight[:, None]) / total[:, None]
    counts = torch.zeros(k, dtype=torch.long).index_add_(0, owner, torch.ones_like(owner))
    features = {}
    for name in teachers:
        if name not in scene.heads:
            raise ValueError(f"the scene has no head for teacher '{name}' (heads: {sorted(scene.heads)})")
        with torch.no_grad():
            features[name] = scene.heads[name].cpu()(pooled)
    return SceneTokens(positions=positions, latent=pooled, counts=counts, features=features)


def decoded_scene(scene: SemanticScene, tokens: SceneTokens, neighbours: int = 3) -> SemanticScene:
    """``scene`` with every Gaussian's latent decoded from ``tokens`` (queryable like the original)."""
    latent = tokens.decode_latent(scene.means.float().cpu(), neighbours)
    return replace(
        scene, latent=latent.to(scene.means.device), source=f"{scene.source} via {tokens.num_tokens} tokens"
    )


@dataclass
class ExportTokens:
    """Write a semantic scene's tokens (positions, latents, optionally decoded teacher features)."""

    scene: Path
    """A semantic PLY with its sidecar (splatsem-export, splatsem-encode)."""
    output: Optional[Path] = None
    """The .npz or .safetensors to write (default: beside the scene, <stem>.tokens.npz)."""
    tokens: int = 512
    """Number of tokens."""
    teachers: Tuple[str, ...] = ()
    """Also store each of these teachers' decoded feature per token."""
    min_opacity: float = 0.05
    """Gaussians below this opacity are left out."""
    checkpoint: Optional[Path] = None
    """A chorus-pretrain run's config.yml: tokens from its encoder's coarsest stage (``encoder_tokens``; the scene
    should be one that encoder's heads decode, e.g. written by ``splatsem-encode`` with the same run). Without it,
    tokens are placed by farthest-point sampling (``scene_tokens``)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Where the encoder runs."""

    def main(self) -> Path:
        scene = load_semantic_scene(self.scene)
        if self.checkpoint is not None:
            from splatsem_ns.models.semantic_splat import restore_network_model

            model = restore_network_model(self.checkpoint, "ns-train chorus-pretrain", self.device)
            with torch.no_grad():
                tokens = encoder_tokens(scene, model.encoder, self.tokens, self.min_opacity, self.teachers)
        else:
            tokens = scene_tokens(scene, self.tokens, self.min_opacity, teachers=self.teachers)
        output = self.output or self.scene.with_name(f"{self.scene.stem}.tokens.npz")
        tokens.save(output)
        print(f"Wrote {tokens.num_tokens} tokens of {scene.num_gaussians} Gaussians to {output}.")
        return output


def main() -> None:
    """Entry point of ``splatsem-tokens``."""
    tyro.cli(ExportTokens).main()


if __name__ == "__main__":
    main()
