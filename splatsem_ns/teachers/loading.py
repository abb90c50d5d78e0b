"""Getting a teacher ready to run: its weights (fail fast when they cannot be had) and its input pixels.

Weights come from, in this order:

1. ``random_weights``: the architecture is built from a config shipped in ``arch_configs/`` (or found in
   the local hub cache) and nothing is loaded. A loud warning says the features mean nothing.
2. ``checkpoint``: a local file or folder. A missing or unreadable one is an error naming the teacher and
   the path; it never falls back to a download.
3. The hub or the official URL, local cache first. Before any download the endpoint is probed with a
   short socket timeout, so a machine without network fails in milliseconds to seconds instead of
   sitting through huggingface_hub's retries (about 23 s per file).

Heavy libraries (transformers, open_clip, segment_anything) are imported inside the functions that need
them: importing ``splatsem_ns.teachers`` stays cheap for CLI start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.checkpoints import load_torch_file
from splatsem_ns.teachers.base import Teacher, TeacherConfig, TeacherWeightsUnavailable

ARCH_CONFIG_DIR = Path(__file__).parent / "arch_configs"
"""Architecture configs of every preset, one JSON per model, in a folder per family."""

CHECKPOINT_FLAG = "--pipeline.datamanager.teacher-checkpoints"
"""The CLI option through which users hand a teacher local weights."""

RANDOM_INIT_SEED = 0
"""Random-weight teachers are built under this seed so that the same config gives the same features in
every process; their cached features then stay valid, as the fingerprint promises."""

PROBE_TIMEOUT_S = 3.0
"""Socket timeout of the reachability probe run before any download."""

_OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_warned_random: Set[Tuple[str, str, str]] = set()


# ---------------------------------------------------------------------------------------------------------
# Errors and warnings
# ---------------------------------------------------------------------------------------------------------


def describe(config: TeacherConfig) -> str:
    """``Teacher 'name' (model_name)``: how every message refers to a teacher."""
    return f"Teacher '{config.name}' ({config.model_name or type(config).__name__})"


def weights_unavailable(config: TeacherConfig, problem: str, hint: str = "") -> TeacherWeightsUnavailable:
    """The error raised whenever weights cannot be had; it always says how to give local ones."""
    lines = [f"{describe(config)}: {problem}"]
    if hint:
        lines.append(hint)
    lines.append(
        f"To use local weights, pass `{CHECKPOINT_FLAG} {config.name} /path/to/weights` (or set `checkpoint` "
        "in the teacher's config), or choose another teacher."
    )
    return TeacherWeightsUnavailable("\n".join(lines))


def warn_random_weights(config: TeacherConfig) -> None:
    """Warn once per process and model that a teacher runs with random weights."""
    key = (type(config).__name__, config.name, config.model_name)
    if key in _warned_random:
        return
    _warned_random.add(key)
    warnings.warn(
        f"{describe(config)} is built with RANDOM weights (random_weights=True): its features carry no "
        "meaning. This is only for tests and speed benchmarks.",
        RuntimeWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------------------
# Network: offline flags and a fast reachability probe
# ---------------------------------------------------------------------------------------------------------


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value (read at call time)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in _OFFLINE_ENV_VARS
    )


def hf_endpoint() -> str:
    """The Hugging Face endpoint, honouring ``HF_ENDPOINT`` (read at call time)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def endpoint_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of ``url`` (or to the proxy configured for it) opens in time.

    This is only a probe: a reachable host can still refuse the download, which the caller reports.
    """
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.hostname:
            host, port = proxy_url.hostname, proxy_url.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_online(config: TeacherConfig, url: str, hint: str = "") -> None:
    """Raise ``TeacherWeightsUnavailable`` at once if a download from ``url`` cannot work."""
    if offline_mode():
        raise weights_unavailable(
            config,
            f"its weights are not in the local cache and offline mode is on (HF_HUB_OFFLINE); needed {url}",
            hint,
        )
    if not endpoint_reachable(url):
        raise weights_unavailable(
            config,
            f"its weights are not in the local cache and {urlparse(url).hostname} cannot be reached (no network?).",
            hint,
        )


# ---------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------


def available_arch_configs(family: str) -> List[str]:
    """Model names that have a shipped architecture config in ``arch_configs/<family>/``."""
    folder = ARCH_CONFIG_DIR / family
    return sorted(p.stem.replace("--", "/") for p in folder.glob("*.json"))


def read_arch_config(family: str, model_name: str) -> Optional[Dict[str, Any]]:
    """The shipped architecture config of ``model_name`` (``/`` in hub ids is stored as ``--``), or None."""
    path = ARCH_CONFIG_DIR / family / (model_name.replace("/", "--") + ".json")
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def checkpoint_path(config: TeacherConfig) -> Path:
    """``config.checkpoint`` as an existing path, or an error naming the teacher and the path."""
    assert config.checkpoint is not None
    path = Path(config.checkpoint).expanduser()
    if not path.exists():
        raise weights_unavailable(config, f"the checkpoint {path} does not exist.")
    return path


def load_state_dict_file(config: TeacherConfig, path: Path) -> Dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or torch file, unwrapped from a ``state_dict``/``model`` entry."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as err:  # corrupt, truncated or not a safetensors file at all
            raise weights_unavailable(config, f"the checkpoint {path} could not be read: {err}") from err
    else:
        state = load_torch_file(
            path,
            what="weights checkpoint",
            remedy="Download the weights again.",
            not_written_by="a torch.save of plain tensors",
            error=lambda message: weights_unavailable(config, message),
        )
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise weights_unavailable(config, f"the checkpoint {path} does not hold a state dict of tensors.")
    return state


def load_into(config: TeacherConfig, module: torch.nn.Module, state: Dict[str, Tensor], path: Path) -> None:
    """Strict ``load_state_dict`` whose failure names the teacher, the file and a few mismatched keys."""
    missing, unexpected = _key_mismatch(module, state)
    if missing or unexpected:
        raise weights_unavailable(
            config,
            f"the checkpoint {path} does not match the architecture of {config.model_name!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}).",
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # same keys, wrong shapes
        raise weights_unavailable(
            config, f"the checkpoint {path} does not fit the architecture: {err}"
        ) from err


def _key_mismatch(module: torch.nn.Module, state: Dict[str, Tensor]) -> Tuple[List[str], List[str]]:
    expected = set(module.state_dict().keys())
    given = set(state.keys())
    return sorted(expected - given), sorted(given - expected)


@contextlib.contextmanager
def seeded_random_init(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Seed torch's CPU generator for a model build without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------------
# Hugging Face transformers models
# ---------------------------------------------------------------------------------------------------------


def hf_config_from_arch(config: TeacherConfig) -> Any:
    """A transformers config for ``config.model_name``: shipped JSON first, then the local hub cache."""
    from transformers import AutoConfig

    arch = read_arch_config("hf", config.model_name)
    if arch is not None:
        arch = dict(arch)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    try:
        return AutoConfig.from_pretrained(config.model_name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{describe(config)}: no architecture config for {config.model_name!r}: none shipped "
            f"(available: {', '.join(available_arch_configs('hf'))}) and none in the local hub cache."
        ) from err


def load_hf_model(config: TeacherConfig, hint: str = "") -> Any:
    """A transformers model in eval mode with frozen weights, following the module's loading order.

    ``hint`` is added to the error when the weights cannot be had (e.g. how to get a gated model).
    """
    from transformers import AutoModel

    if config.random_weights:
        warn_random_weights(config)
        arch = hf_config_from_arch(config)
        with seeded_random_init():
            model = AutoModel.from_config(arch)
    elif config.checkpoint is not None:
        path = checkpoint_path(config)
        if path.is_dir():
            try:
                model = AutoModel.from_pretrained(str(path), local_files_only=True)
            except Exception as err:
                raise weights_unavailable(
                    config, f"the checkpoint folder {path} could not be loaded: {err}"
                ) from err
        else:
            state = load_state_dict_file(config, path)
            try:
                arch = hf_config_from_arch(config)
            except ValueError as err:
                raise weights_unavailable(
                    config, f"{err} A single weights file needs it; give a snapshot folder with config.json."
                ) from err
            with seeded_random_init():
                model = AutoModel.from_config(arch)
            load_into(config, model, _drop_unused_buffers(model, state), path)
    else:
        try:
            model = AutoModel.from_pretrained(config.model_name, local_files_only=True)
        except OSError:
            ensure_online(config, f"{hf_endpoint()}/{config.model_name}", hint)
            try:
                model = AutoModel.from_pretrained(config.model_name)
            except Exception as err:
                if not hint and _looks_gated(err):
                    hint = gated_hint(config.model_name)
                raise weights_unavailable(
                    config, f"downloading from the Hugging Face Hub failed: {err}", hint
                ) from err
    model.eval()
    model.requires_grad_(False)
    return model


def gated_hint(model_name: str) -> str:
    """What to do about a gated hub model."""
    return (
        f"{model_name} is gated on the Hugging Face Hub: accept its license at {hf_endpoint()}/{model_name} "
        "and log in (`hf auth login` or HF_TOKEN), or give a local checkpoint."
    )


def _looks_gated(err: BaseException) -> bool:
    seen: Optional[BaseException] = err
    while seen is not None:
        if "Gated" in type(seen).__name__ or any(code in str(seen) for code in ("401", "403")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _drop_unused_buffers(model: torch.nn.Module, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    # Older transformers saved non-persistent buffers such as position_ids; they carry no weights.
    expected = set(model.state_dict().keys())
    return {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}


def load_hf_tokenizer(config: TeacherConfig, source: str, hint: str = "") -> Any:
    """The tokenizer of a hub model or snapshot folder ``source``, local cache first, then the hub."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as err:  # not cached; transformers raises OSError, ValueError or even ImportError here
        if Path(source).is_dir():
            raise weights_unavailable(
                config, f"no usable tokenizer files in {source} ({type(err).__name__}).", hint
            ) from err
    ensure_online(config, f"{hf_endpoint()}/{source}", hint)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise weights_unavailable(
            config, f"downloading the tokenizer of {source} failed: {err}", hint
        ) from err


# ---------------------------------------------------------------------------------------------------------
# Files behind a URL
# ---------------------------------------------------------------------------------------------------------


def url_checkpoint(config: TeacherConfig, url: str) -> Path:
    """A file from ``url`` in torch hub's checkpoint folder: reused if there, else downloaded."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if target.is_file():
        return target
    ensure_online(config, url)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # download_url_to_file writes a temporary file and moves it into place, so no partial file remains.
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as err:
        raise weights_unavailable(config, f"downloading {url} failed: {err}") from err
    return target


# ---------------------------------------------------------------------------------------------------------
# Input pixels
# ---------------------------------------------------------------------------------------------------------


def check_images(config: TeacherConfig, images: Tensor) -> None:
    """Reject anything that is not a float batch ``[B, 3, H, W]``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{describe(config)}: expected images of shape [B, 3, H, W], got {tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise ValueError(f"{describe(config)}: expected float images in [0, 1], got dtype {images.dtype}.")


def network_pixels(
    teacher: Teacher,
    images: Float[Tensor, "B 3 H W"],
    mean: Sequence[float],
    std: Sequence[float],
    mode: str = "bilinear",
) -> Tuple[Float[Tensor, "B 3 h w"], Tuple[int, int]]:
    """A teacher's checked, resized and normalised network input, and its size ``(h, w)``."""
    check_images(teacher.config, images)
    teacher.eval()
    size = teacher.network_input_size(*images.shape[-2:])
    return resize_and_normalize(images.to(teacher.device, torch.float32), size, mean, std, mode), size


def resize_and_normalize(
    images: Float[Tensor, "B 3 H W"],
    size: Tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    mode: str = "bilinear",
) -> Float[Tensor, "B 3 h w"]:
    """Antialiased resize to ``size`` (clamped back to [0, 1]: bicubic overshoots), then ``(x - mean) / std``."""
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False).clamp(
            0.0, 1.0
        )
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t
