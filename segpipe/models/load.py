"""Any model file segpipe runs, loaded the same way on the client (checks) and on the workers.

- a segpipe checkpoint (``torch.save`` of plain values and tensors, read with ``weights_only=True``);
- a TorchScript file (``torch.jit.save``) or an ONNX file (run by onnxruntime), each with its model card
  beside it (:mod:`segpipe.models.card`);
- a MONAI bundle folder (:mod:`segpipe.models.bundle`);
- an nnU-Net v2 trained-model folder (:mod:`segpipe.models.nnunet`).

None runs pickled Python: weights-only unpickling accepts tensors and plain containers only,
TorchScript's loader builds TorchScript code and types, never arbitrary Python objects, and ONNX is a
protobuf graph of standard operators.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from segpipe.errors import InputError
from segpipe.geometry import scale_for
from segpipe.models.bundle import is_bundle, load_bundle
from segpipe.models.card import card_path, read_card
from segpipe.models.checkpoint import ModelSpec, load_model
from segpipe.models.nnunet import is_nnunet, load_nnunet


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` archives have none."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class SigmoidAsClasses(torch.nn.Module):
    """Sigmoid channels as classes. A binary model's single channel: a logit z as the logits (0, z), whose softmax
    is (1 - sigmoid(z), sigmoid(z)); a probability p (``probabilities``: the graph ends in its sigmoid) as
    (1 - p, p). Several channels (multi-label) as (0, c_1 .. c_K), logits or probabilities as they come.
    Thresholds and the multi-label rule are applied after blending (:class:`segpipe.tiling.stitch.Decoding`)."""

    def __init__(self, net: torch.nn.Module, probabilities: bool = False) -> None:
        super().__init__()
        self.net = net
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        first = z[:, :1]
        return torch.cat([1 - z if self.probabilities and z.shape[1] == 1 else torch.zeros_like(first), z], dim=1)


class OnnxNet(torch.nn.Module):
    """An ONNX file run by onnxruntime behind the interface of a torch module (tensor in, logits out).

    On a GPU worker onnxruntime's CUDA provider computes (the tensors go through host memory); elsewhere its
    CPU provider, with as many threads as torch has been given (the worker's share of the cores).
    """

    def __init__(self, path: str | Path, device: str) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("ONNX models need onnxruntime: pip install 'segpipe[onnx]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise InputError(f"model {Path(path).name} is not a loadable ONNX file: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run(None, {self.input: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(y).to(x.device)


def _carded(path: str | Path) -> bool:
    """A TorchScript file (recognised by content), or any file with a card beside it or named ``*.onnx``."""
    return is_torchscript(path) or card_path(path).is_file() or Path(path).suffix.lower() == ".onnx"


def _load_carded(path: str | Path, device: str) -> tuple[torch.nn.Module, ModelSpec]:
    """A TorchScript or ONNX file, as its card's ``format`` says (which must agree with the file's content)."""
    torchscript = is_torchscript(path)
    card = read_card(path)
    if (card.format == "torchscript") != torchscript:
        raise InputError(f"model {Path(path).name} is {'' if torchscript else 'not '}a TorchScript file, "
                         f"but its card says format: {card.format}")
    net: torch.nn.Module = (torch.jit.load(str(path), map_location=device) if torchscript
                            else OnnxNet(path, device)).eval()
    if card.output == "sigmoid":
        net = SigmoidAsClasses(net, probabilities=card.returns == "probabilities").eval()
    return net, card.spec(card.format)


def _any_file(path: str | Path) -> bool:  # noqa: ARG001 - the fallback: a segpipe checkpoint or its error
    return True


@dataclass(frozen=True)
class ModelFormat:
    """One kind of model path: how it is recognised, loaded, and which of its files its digest covers
    (``parts``: globs inside a model folder; None for a single file and the card beside it)."""

    name: str
    recognises: Callable[[str | Path], bool]
    load: Callable[[str | Path, str], tuple[torch.nn.Module, ModelSpec]]
    parts: tuple[str, ...] | None = None


MODEL_FORMATS: tuple[ModelFormat, ...] = (  # in detection order: the first that recognises a path loads it
    ModelFormat("monai-bundle", is_bundle, load_bundle, ("configs/**/*", "models/**/*")),
    ModelFormat("nnunet", is_nnunet, load_nnunet, ("plans.json", "dataset.json", "fold_*/checkpoint_final.pth")),
    ModelFormat("carded", _carded, _load_carded),
    ModelFormat("checkpoint", _any_file, load_model),
)


def model_format(path: str | Path) -> ModelFormat:
    """The format of a model path (see :data:`MODEL_FORMATS` for the order)."""
    return next(f for f in MODEL_FORMATS if f.recognises(path))


def load_any(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """An eval-mode model on ``device`` and its spec: a bundle or nnU-Net folder, a TorchScript or ONNX file and
    its card, else a segpipe checkpoint (:data:`MODEL_FORMATS`)."""
    return model_format(path).load(path, device)


def model_digest(path: str | Path) -> str:
    """SHA-256 of the model file and of its card, if it has one (of a bundle or nnU-Net folder: its configs and
    weights), any of which changes every pixel's logits."""
    globs = model_format(path).parts
    if globs:
        h = hashlib.sha256()
        for part in sorted({p for g in globs for p in Path(path).glob(g) if p.is_file()}):
            h.update(part.relative_to(path).as_posix().encode() + b"\0" + part.read_bytes())
        return h.hexdigest()
    h = hashlib.sha256(Path(path).read_bytes())
    if card_path(path).is_file():
        h.update(card_path(path).read_bytes())
    return h.hexdigest()


def check_patch(model: torch.nn.Module, name: str, patch: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """One dry forward pass on the client: the model must map a patch to logits of the same size.

    Cheaper than learning it from a failed task on a worker, and it works for any architecture
    (each has its own divisibility rules). Returns the zero patch and its logits.
    """
    x = torch.zeros((1, spec.in_channels, *(patch,) * spec.dims))
    try:
        with torch.inference_mode():
            y = model(x)
    except RuntimeError as exc:
        raise InputError(f"model {name} cannot run on patch_size {patch}: "
                         f"{str(exc).splitlines()[0]}") from None
    if tuple(y.shape) != (1, spec.n_classes, *(patch,) * spec.dims):
        raise InputError(f"model {name} maps a {patch}-pixel patch to shape {tuple(y.shape)[2:]}, "
                         f"not to the patch size; choose another patch_size")
    return x, y


def model_scale(spec: ModelSpec, name: str, pixel_size: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """Per axis, the model's training pixel size over the scene's, or None to run at the scene's own pixels.

    A model applied at another scale than it was trained at quietly gives wrong classes, so a scene whose
    pixel size differs by more than 1 % is resampled to the model's (:mod:`segpipe.tiling.resample`). Sizes too far
    apart to be a real difference of scale (other units) are refused in one line.
    """
    try:
        return scale_for(spec.resolution, pixel_size, name)
    except ValueError as exc:
        raise InputError(str(exc)) from None
